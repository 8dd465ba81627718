"""PEERS in Django terms: the peers' ``DATABASES`` entries and the `PeerSet` of a pool.

The Django glue of ``peerset.py`` (which knows nothing of Django).

An alias with ``PEERS`` keeps one pool (``MAX_CONNS`` caps the whole pool, its pool
options are the alias's own); each new server connection goes to one peer and is
opened with that peer's own entry: ``NAME``, ``HOST``, ``PORT``, ``USER``,
``PASSWORD`` and ``OPTIONS`` (libpq and driver options; its pool options are
ignored). What Django does per session (``isolation_level``, ``assume_role``,
``TIME_ZONE``, ``connection_created``) is the alias's own, whichever peer serves.
Every entry is read at connect time, so a reconnect hook may change any of them.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured

from ..peerset import PeerSet
from .options import PoolSettings

__all__ = ["build_peer_set", "peer_connection_params", "peer_settings"]


def peer_settings(peer: str) -> dict[str, Any]:
    """The ``DATABASES`` entry of ``peer``, as Django's connection handler holds it."""
    from django.db import connections

    return connections.settings[peer]


def build_peer_set(
    alias: str, settings: PoolSettings, connect_errors: tuple[type[BaseException], ...]
) -> PeerSet | None:
    """The alias's peers (itself first), or None without ``PEERS``; checks they exist."""
    if not settings.peers:
        return None
    from django.db import connections

    missing = [peer for peer in settings.peers if peer not in connections.settings]
    if missing:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}] PEERS names {missing[0]!r}, which is not in DATABASES. "
            "PEERS lists other DATABASES aliases whose entries hold each peer's "
            "HOST, PORT, NAME, USER, PASSWORD and OPTIONS."
        )
    return PeerSet(
        alias,
        (alias, *settings.peers),
        check_interval=settings.check_interval,
        connect_errors=connect_errors,
    )


def peer_connection_params(wrapper: Any, peer: str) -> dict[str, Any]:
    """Connection parameters for ``peer``'s entry, built exactly as for ``wrapper``'s own.

    A throwaway wrapper of the same class over the peer's entry (no I/O) runs
    Django's ``get_connection_params``, so the peer gets the same treatment as
    the alias: ``OPTIONS`` passed to libpq, pool options removed, psycopg 3
    adapters context and cursor factory.
    """
    if peer == wrapper.alias:
        return wrapper.get_connection_params()
    return type(wrapper)(peer_settings(peer), peer).get_connection_params()
