"""The Django glue, written once: a mixin over Django's PostgreSQL ``DatabaseWrapper``.

Django's lifecycle stays intact: ``connect()`` still resets the wrapper's state,
calls `get_new_connection`, sets autocommit, runs ``init_connection_state()`` and
sends ``connection_created``; ``close()`` still handles atomic blocks and
``run_on_commit``. The mixin overrides only the narrow hooks:

* `get_new_connection` checks a connection out of the alias's pool. New server
  connections are opened through Django's own ``get_new_connection`` (isolation
  level, JSONB loader, PostGIS adapters) followed by Django's session set-up
  (time zone, ``assume_role``), once per server connection, with the connection
  parameters read at that moment.
* `_close` gives the connection back: reset and reused, or closed if it was closed
  inside ``atomic()``.
* `close_if_unusable_or_obsolete` always gives the connection back at request
  boundaries, whatever ``CONN_MAX_AGE`` says: idle connections live in the pool.
* `close_pool` closes the alias's pool (Django's test-database code calls it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper

from .. import registry, signals
from ..pool import ConnectionPool, Lease
from .drivers import driver_ops
from .options import POOL_OPTION_NAMES, PoolSettings, parse_pool_settings

__all__ = ["PooledDatabaseWrapperMixin"]

logger = logging.getLogger(__name__)

# What identifies the server and account a connection belongs to: an idle
# connection opened for other values (a test database, a rotated user) is not
# handed out.
_TARGET_KEYS = ("NAME", "HOST", "PORT", "USER")


class PooledDatabaseWrapperMixin:
    """Serve a Django PostgreSQL ``DatabaseWrapper`` from a per-alias gevent pool."""

    _pool_lease: Lease | None = None

    # -- the pool -------------------------------------------------------------

    @property
    def geventpool(self) -> ConnectionPool | None:
        """This alias's pool, created on first use (no I/O); None for the no-db alias."""
        if self.alias == NO_DB_ALIAS:
            return None
        pool = registry.pools.get(self.alias)
        if pool is None or pool.closed:
            pool = self._create_geventpool()
        return pool

    def _create_geventpool(self) -> ConnectionPool:
        settings: PoolSettings = parse_pool_settings(self.alias, self.settings_dict)
        ops = driver_ops()
        ops.ensure_cooperative(self.alias)
        pool = ConnectionPool(self.alias, ops, **settings.pool_kwargs())
        pool.settings = settings  # type: ignore[attr-defined]
        # setdefault: if two greenlets raced here, both use the first pool.
        existing = registry.pools.get(self.alias)
        if existing is not None and not existing.closed:
            return existing
        registry.pools[self.alias] = pool
        return pool

    def close_pool(self) -> None:
        """Close this alias's pool; the next checkout creates a new one."""
        pool = registry.pools.pop(self.alias, None)
        if pool is not None:
            pool.close()

    # -- Django's connection hooks --------------------------------------------

    def get_connection_params(self) -> dict[str, Any]:
        params = super().get_connection_params()  # type: ignore[misc]
        for name in POOL_OPTION_NAMES:
            params.pop(name, None)
        return params

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        pool = self.geventpool
        if pool is None:
            return super().get_new_connection(conn_params)  # type: ignore[misc]
        if self._pool_lease is not None:
            # A previous checkout was never given back through close(): give it
            # back now rather than leak its slot.
            self._give_back(self._pool_lease)
        lease = pool.checkout(self._open_pooled_connection, owner=self, target=self._target())
        self._pool_lease = lease
        if "isolation_level" not in self.__dict__:
            # Django sets it when it opens a connection; a reused one needs it too.
            self.isolation_level = _configured_isolation_level(self.settings_dict)
        return lease.connection

    def _target(self) -> tuple:
        settings_dict = self.settings_dict
        return tuple(settings_dict.get(key) for key in _TARGET_KEYS)

    def _open_pooled_connection(self, reconnect: bool) -> Any:
        """Open a server connection the way Django's own backend would; called by the pool."""
        if reconnect:
            signals.send_pre_reconnect(self)
        # Read now, not when the pool was created: a hook may have changed them.
        params = self.get_connection_params()
        raw = super().get_new_connection(params)  # type: ignore[misc]
        try:
            ops = driver_ops()
            if ops.transaction_status(raw) != 0:
                # Per-connection set-up (PostGIS type lookups) ran in a transaction.
                ops.commit(raw)
            ops.restore_autocommit(raw)
            # Django's per-session set-up (time zone, assume_role), done once per
            # server connection instead of at every checkout.
            self._configure_connection(raw)  # type: ignore[attr-defined]
        except BaseException:
            raw.close()
            raise
        if reconnect:
            signals.send_post_reconnect(self)
        return raw

    def init_connection_state(self) -> None:
        if self._pool_lease is None:
            return super().init_connection_state()  # type: ignore[misc]
        # The session set-up of Django's PostgreSQL backend was done when the
        # server connection was opened; only the generic part runs per checkout.
        BaseDatabaseWrapper.init_connection_state(self)  # type: ignore[arg-type]

    def _close(self) -> None:
        lease = self._pool_lease
        if lease is None:
            return super()._close()  # type: ignore[misc]
        self._pool_lease = None
        if self.in_atomic_block:
            # Closed inside atomic(): the transaction is abandoned; never reuse it.
            lease.pool.discard(lease)
        else:
            lease.pool.checkin(lease)

    def _give_back(self, lease: Lease) -> None:
        self._pool_lease = None
        lease.pool.checkin(lease)

    def close_if_unusable_or_obsolete(self) -> None:
        if self._pool_lease is not None:
            # Idle connections belong in the pool, whatever CONN_MAX_AGE says.
            self.close()
            return
        super().close_if_unusable_or_obsolete()  # type: ignore[misc]

    def _forget_inherited_connection(self) -> None:
        """After fork: drop the parent's connection without closing it (see pool)."""
        if self._pool_lease is not None:
            self._pool_lease = None
            self.connection = None


def _configured_isolation_level(settings_dict: dict[str, Any]) -> Any:
    from django.db.backends.postgresql.psycopg_any import IsolationLevel

    level = settings_dict["OPTIONS"].get("isolation_level")
    return IsolationLevel.READ_COMMITTED if level is None else IsolationLevel(level)


def _forget_in_child() -> None:
    # The pools forget their connections themselves; the wrappers of the greenlet
    # that forked must also stop pointing at them.
    from django.db import connections

    for wrapper in connections.all(initialized_only=True):
        if isinstance(wrapper, PooledDatabaseWrapperMixin):
            wrapper._forget_inherited_connection()


os.register_at_fork(after_in_child=_forget_in_child)
