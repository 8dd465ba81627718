"""The process's pools, one per database alias, each with what the glue built it from.

Process-global on purpose: every greenlet has its own Django ``DatabaseWrapper``
(Django keeps them in a greenlet-local), and the cap is per process and alias, so
all those wrappers must share one pool. After ``fork()`` the pools themselves
forget their parent's connections (see `forking`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .pool import ConnectionPool

if TYPE_CHECKING:
    from .backends.options import PoolSettings
    from .peerset import PeerSet

__all__ = ["AliasPool", "aliases", "close_all", "created_hooks", "open_pools", "pool_of"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AliasPool:
    """One alias's pool, its validated options and its peers (None without ``PEERS``)."""

    pool: ConnectionPool
    settings: PoolSettings
    peer_set: PeerSet | None


#: alias -> its record; a closed pool stays until the next checkout replaces it.
aliases: dict[str, AliasPool] = {}

#: Called with each pool the backend creates, before its first checkout (exporters
#: that need every sample attach their listeners here).
created_hooks: list[Callable[[ConnectionPool], None]] = []


def pool_of(alias: str) -> ConnectionPool | None:
    """``alias``'s pool if one was created (it may be closed), else None. No I/O."""
    record = aliases.get(alias)
    return None if record is None else record.pool


def open_pools() -> list[ConnectionPool]:
    """The pools of this process that are not closed."""
    return [record.pool for record in list(aliases.values()) if not record.pool.closed]


def close_all() -> None:
    """Close every pool of the process and forget it (the next checkout creates a new one).

    Used at process exit (gunicorn's ``worker_exit``) and between tests. Connections
    in use are closed when they are given back.
    """
    while aliases:
        alias, record = aliases.popitem()
        try:
            record.pool.close()
        except Exception:  # closing the others matters more; say what failed
            logger.exception("closing the pool of %r failed", alias)
