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

With ``PEERS`` the alias still has one pool; each new server connection goes to
a peer chosen by the pool's `PeerSet` and is opened with that peer's
``DATABASES`` entry (see ``peers_glue.py`` and ``peerset.py``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from django.conf import settings as django_settings
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.utils import DatabaseErrorWrapper
from django.utils.functional import cached_property

from .. import forking, otel, registry, signals
from ..pool import ConnectionPool, Lease
from ..statslog import start_stats_logger
from .drivers import driver_ops
from .options import POOL_OPTION_NAMES, PoolSettings, parse_pool_settings
from .peers_glue import build_peer_set, peer_connection_params, peer_settings
from .pool_mode import PoolModeSwitch

__all__ = ["PooledDatabaseWrapperMixin", "connection_target", "pooled_aliases"]

logger = logging.getLogger(__name__)

# What identifies the server and account a connection belongs to: an idle
# connection opened for other values (a test database, a rotated user) is not
# handed out.
_TARGET_KEYS = ("NAME", "HOST", "PORT", "USER")
_POOL_OPTION_SET = frozenset(POOL_OPTION_NAMES)
# libpq's target_session_attrs values that ask for a server accepting writes.
_WRITABLE_SESSION_ATTRS = frozenset({"read-write", "primary"})
# Transaction states an interrupted query leaves behind (libpq numbering).
_INTERRUPTED = frozenset({1, 4})  # ACTIVE, UNKNOWN

# alias -> (what the parameters were built from, a copy of OPTIONS, the parameters).
# Process-global like the pools: each greenlet has its own wrapper, and a web
# request's greenlet checks out once, so a per-wrapper cache would never hit.
_params_by_alias: dict[str, tuple[tuple, dict[str, Any], dict[str, Any]]] = {}


class PooledDatabaseWrapperMixin(PoolModeSwitch):
    """Serve a Django PostgreSQL ``DatabaseWrapper`` from a per-alias gevent pool.

    ``POOL_MODE = "transaction"`` gives the connection back between uses instead of
    at the end of the request: `PoolModeSwitch` gives such a wrapper the class of
    its transaction mode (`pool_mode.PoolModeMixin` first).
    """

    _pool_lease: Lease | None = None

    # -- the pool -------------------------------------------------------------

    @property
    def geventpool(self) -> ConnectionPool | None:
        """This alias's pool, created on first use (no I/O); None for the no-db alias."""
        record = self._geventpool_record()
        return None if record is None else record.pool

    def _geventpool_record(self) -> registry.AliasPool | None:
        """This alias's record (pool, settings, peers), created on first use; None for no-db."""
        if self.alias == NO_DB_ALIAS:
            return None
        record = registry.aliases.get(self.alias)
        if record is None or record.pool.closed:
            record = self._create_geventpool()
        return record

    def _create_geventpool(self) -> registry.AliasPool:
        settings: PoolSettings = parse_pool_settings(self.alias, self.settings_dict)
        ops = driver_ops()
        ops.ensure_cooperative(self.alias)
        # With PEERS: one pool over all peers; the peer set counts each peer's
        # connections (the pool tells it of each close) and adds its stats.
        peer_set = build_peer_set(self.alias, settings, ops.connect_errors)
        peers = 1 if peer_set is None else len(peer_set.peers)
        pool = ConnectionPool(
            self.alias,
            ops,
            on_close=None if peer_set is None else peer_set.closed,
            opener=_pool_opener(type(self), self.settings_dict, self.alias, peer_set),
            target_of=functools.partial(_target_of, self.settings_dict, peer_set),
            # One attempt per peer, each bounded by connect_timeout or POOL_TIMEOUT
            # (see _open_pooled_connection); the pool bounds the whole call too.
            connect_timeout=settings.pool_timeout * peers + 1.0,
            writable_required=writable_required(self.settings_dict),
            **settings.pool_kwargs(),
        )
        if peer_set is not None:
            pool.add_stats_source(peer_set.get_stats)
            pool.read_only_listeners.append(peer_set.read_only)
        # setdefault: if two greenlets raced here, both use the first pool.
        existing = registry.aliases.get(self.alias)
        if existing is not None and not existing.pool.closed:
            pool.close()  # it may have started warming up (MIN_CONNS)
            return existing
        record = registry.AliasPool(pool, settings, peer_set)
        registry.aliases[self.alias] = record
        otel.attach(pool)  # does nothing without opentelemetry-api
        for hook in registry.created_hooks:
            hook(pool)
        if settings.stats_log_interval is not None:
            start_stats_logger(pool, settings.stats_log_interval)
        return record

    def close_pool(self) -> None:
        """Close this alias's pool; the next checkout creates a new one."""
        record = registry.aliases.pop(self.alias, None)
        if record is not None:
            record.pool.close()

    # -- Django's connection hooks --------------------------------------------

    def get_connection_params(self) -> dict[str, Any]:
        if "pool" in (self.settings_dict.get("OPTIONS") or {}):
            # Django's own check would speak first, and on psycopg2 it says
            # "requires psycopg >= 3": raise ours, which says what to do.
            parse_pool_settings(self.alias, self.settings_dict)
        # Django's connect() asks for the parameters at every checkout, though a
        # checkout that reuses a connection never uses them: rebuild them only when
        # what they are built from has changed (a hook may change settings_dict).
        settings_dict = self.settings_dict
        source = (
            settings_dict.get("NAME"),
            settings_dict.get("USER"),
            settings_dict.get("PASSWORD"),
            settings_dict.get("HOST"),
            settings_dict.get("PORT"),
            django_settings.USE_TZ,
            self.timezone,
        )
        options = settings_dict.get("OPTIONS") or {}
        cached = _params_by_alias.get(self.alias)
        if cached is not None and cached[0] == source and cached[1] == options:
            return dict(cached[2])
        params = super().get_connection_params()
        for name in _POOL_OPTION_SET.intersection(params):
            del params[name]
        _params_by_alias[self.alias] = (source, dict(options), dict(params))
        return params

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        # The registry first: this runs at every checkout.
        record = registry.aliases.get(self.alias)
        if record is None or record.pool.closed:
            record = self._geventpool_record()
            if record is None:
                return super().get_new_connection(conn_params)
        if self._pool_lease is not None:
            # A previous checkout was never given back through close(): give it
            # back now rather than leak its slot.
            self._give_back(self._pool_lease)
        # New server connections are opened by the pool's connectors (see
        # _pool_opener); this checkout only waits, within POOL_TIMEOUT.
        lease = record.pool.checkout(
            owner=self, target=_target_of(self.settings_dict, record.peer_set)
        )
        self._pool_lease = lease
        if "isolation_level" not in self.__dict__:
            # Django sets it when it opens a connection; a reused one needs it too.
            self.isolation_level = _configured_isolation_level(self.settings_dict)
        return lease.connection

    def _open_on_peer(self, peer: str, reconnect: bool) -> Any:
        return self._open_pooled_connection(reconnect, peer)

    def _open_pooled_connection(self, reconnect: bool, peer: str | None = None) -> Any:
        """Open a server connection the way Django's own backend would; called by the pool.

        ``peer``: the ``DATABASES`` alias whose entry gives the connection
        parameters (default: this alias). Runs in a connector greenlet of the
        pool, on a wrapper of its own (see `_pool_opener`).
        """
        if reconnect:
            signals.send_pre_reconnect(self)
        # Read now, not when the pool was created: a hook may have changed them.
        params = (
            self.get_connection_params() if peer is None else peer_connection_params(self, peer)
        )
        ops = driver_ops()
        # Each attempt (each peer) is bounded: libpq's connect_timeout if set, else
        # POOL_TIMEOUT; a peer that never answers is marked down like a refusing one.
        fallback = parse_pool_settings(self.alias, self.settings_dict).pool_timeout
        with ops.connect_deadline(params, fallback):
            # The name lookup too: inside the deadline, and never blocking the hub.
            raw = super().get_new_connection(ops.resolve_hosts(params))
        try:
            if writable_required(self.settings_dict) and ops.read_only(raw):
                # libpq checks target_session_attrs for the entry that sets it only
                # (a PEERS entry may lack it): check every connection here.
                raise ops.connect_errors[0](
                    f"the server at host={params.get('host')!r} port={params.get('port')!r} "
                    "is read-only, and target_session_attrs asks for a writable server"
                )
            if ops.transaction_status(raw) != 0:
                # Per-connection set-up (PostGIS type lookups) ran in a transaction.
                ops.commit(raw)
            ops.restore_autocommit(raw)
            # Django's per-session set-up (time zone, assume_role), done once per
            # server connection instead of at every checkout.
            self._configure_session(raw)
            if self._transaction_mode_configured():
                # Transaction mode sends connection_created once per server
                # connection, here, rather than at every checkout.
                self._announce_server_connection(raw)
                if ops.transaction_status(raw) != 0:
                    ops.commit(raw)
            if reconnect:
                # Inside the try: a failing post-reconnect hook must not leak raw.
                signals.send_post_reconnect(self)
        except BaseException:
            raw.close()
            raise
        return raw

    def _configure_session(self, raw: Any) -> bool:
        """Run Django's session set-up on ``raw``; True if it needs a commit.

        Django's ``assume_role`` set-up quotes the role through the wrapper's own
        cursor, so the wrapper must point at ``raw`` meanwhile: with no connection
        it would check out another one (a deadlock at MAX_CONNS=1).
        """
        previous = self.connection
        self.connection = raw
        try:
            needs_commit = bool(self._configure_connection(raw))  # type: ignore[attr-defined]
        finally:
            self.connection = previous
        # The pool's own session settings (psycopg2: the server ends abandoned queries).
        return driver_ops().configure_session(raw) or needs_commit

    def init_connection_state(self) -> None:
        lease = self._pool_lease
        if lease is None:
            return super().init_connection_state()
        # The session set-up of Django's PostgreSQL backend was done when the
        # server connection was opened; only the generic part runs per checkout.
        BaseDatabaseWrapper.init_connection_state(self)
        if lease.pool.reset_query:
            # A reset query such as DISCARD ALL also undid the session set-up
            # (role, time zone) when the connection was returned: redo it.
            if self._configure_session(self.connection) and not self.get_autocommit():
                self.connection.commit()

    def _close(self) -> None:
        lease = self._pool_lease
        if lease is None:
            return super()._close()  # type: ignore[misc]
        self._pool_lease = None
        self._end_pool_mode_checkout()
        if self.in_atomic_block:
            # Closed inside atomic(): the transaction is abandoned; never reuse it.
            lease.pool.discard(lease)
        else:
            lease.pool.checkin(lease)

    def _set_autocommit(self, autocommit: bool) -> None:
        # Django's connect() sets autocommit at every checkout, and the pool hands
        # connections out in autocommit already: skip the no-op, which psycopg 3
        # runs through its lock and wait machinery (about 2 µs per checkout).
        if self._pool_lease is not None:
            if self.connection.autocommit == autocommit:
                return
            if self._abandon_if_interrupted():
                return
        super()._set_autocommit(autocommit)  # type: ignore[misc]

    # -- an interrupted query ------------------------------------------------------
    #
    # A gevent.Timeout or a kill that lands while a query runs leaves the driver
    # connection closed (psycopg2) or in ACTIVE state (psycopg 3). Django's
    # atomic() then rolls back and restores autocommit on it, which raises
    # InterfaceError / ProgrammingError in place of the interruption. Neither is
    # worth doing on such a connection: the server rolls back when it goes away.

    def _rollback(self) -> None:
        if self._pool_lease is not None and self._abandon_if_interrupted():
            return
        super()._rollback()  # type: ignore[misc]

    @cached_property
    def wrap_database_errors(self) -> DatabaseErrorWrapper:
        return _InterruptionAwareErrorWrapper(self)

    def _after_interruption(self) -> None:
        """A statement (or connect, commit) was interrupted: never reuse its connection.

        Outside ``atomic()`` the request may catch the interruption and go on; its
        next statement then checks out another connection instead of failing on
        this one. Inside, Django's ``atomic()`` exit sees ``closed_in_transaction``
        and leaves the rollback to the server, as for any connection lost there.
        """
        if self._pool_lease is not None:
            self._abandon_if_interrupted()

    def _abandon_if_interrupted(self) -> bool:
        """Give back (to be closed) a connection an interruption left unusable; True if so."""
        lease = self._pool_lease
        assert lease is not None
        ops = lease.pool.driver
        raw = lease.connection
        if not ops.is_closed(raw) and ops.transaction_status(raw) not in _INTERRUPTED:
            return False
        self._pool_lease = None
        self.connection = None
        # Inside atomic()'s exit: it must not restore autocommit (which would check
        # out another connection); connect() clears the flag.
        self.closed_in_transaction = True
        # checkin() cancels a query still running in the server, then closes.
        lease.pool.checkin(lease)
        return True

    def _give_back(self, lease: Lease) -> None:
        self._pool_lease = None
        self._end_pool_mode_checkout()
        lease.pool.checkin(lease)

    def close_if_unusable_or_obsolete(self) -> None:
        if self._pool_lease is not None:
            # Idle connections belong in the pool, whatever CONN_MAX_AGE says.
            self.close()
            return
        super().close_if_unusable_or_obsolete()

    def _forget_inherited_connection(self) -> None:
        """After fork: drop the parent's connection without closing it (see pool)."""
        if self._pool_lease is not None:
            self._pool_lease = None
            self.connection = None


def pooled_aliases() -> list[str]:
    """The ``DATABASES`` aliases whose ENGINE is a django_db_geventpool backend."""
    from django.db import connections

    return [
        alias
        for alias in connections.settings
        if isinstance(connections[alias], PooledDatabaseWrapperMixin)
    ]


def writable_required(settings_dict: dict[str, Any]) -> bool:
    """True if the entry asks libpq for a writable server (``target_session_attrs``)."""
    options = settings_dict.get("OPTIONS") or {}
    return options.get("target_session_attrs") in _WRITABLE_SESSION_ATTRS


def _pool_opener(
    wrapper_class: type, settings_dict: dict[str, Any], alias: str, peer_set: Any
) -> Any:
    """What the pool's connectors call to open a connection (``opener(reconnect)``)."""

    def open_connection(reconnect: bool) -> Any:
        # A wrapper of its own per connect, over the alias's shared settings_dict
        # (reconnect hooks may change it): the session set-up points the wrapper
        # at the new connection for a while, and connects run concurrently.
        wrapper = wrapper_class(settings_dict, alias)
        if peer_set is None:
            return wrapper._open_pooled_connection(reconnect)
        return peer_set.open_connection(wrapper._open_on_peer, reconnect)

    return open_connection


def _target_of(settings_dict: dict[str, Any], peer_set: Any) -> tuple:
    """What a connection for this entry is connected to, as the pool compares it."""
    target = connection_target(settings_dict)
    if peer_set is None:
        return target
    # An idle connection to any peer will do: the target is the whole set's,
    # and it changes (closing idle connections) when any peer's entry does.
    return (
        target,
        *tuple(connection_target(peer_settings(peer.name)) for peer in peer_set.peers[1:]),
    )


def connection_target(settings_dict: dict[str, Any]) -> tuple:
    """What identifies the server and account of a ``DATABASES`` entry (``_TARGET_KEYS``)."""
    return tuple(map(settings_dict.get, _TARGET_KEYS))  # per checkout: no generator


def _configured_isolation_level(settings_dict: dict[str, Any]) -> Any:
    from django.db.backends.postgresql.psycopg_any import IsolationLevel

    level = settings_dict["OPTIONS"].get("isolation_level")
    return IsolationLevel.READ_COMMITTED if level is None else IsolationLevel(level)


def _forget_in_child() -> None:
    # Step 3 of forking's hook: the pools have forgotten their connections; the
    # wrappers of the greenlet that forked must also stop pointing at them.
    from django.db import connections

    for wrapper in connections.all(initialized_only=True):
        if isinstance(wrapper, PooledDatabaseWrapperMixin):
            wrapper._forget_inherited_connection()


forking.on_fork_in_child(_forget_in_child)


class _InterruptionAwareErrorWrapper(DatabaseErrorWrapper):
    """Django's driver-error translation, which also sees interruptions go by.

    Every statement, connect and commit runs inside it, so it is where a
    ``gevent.Timeout`` or a kill that lands on the driver is seen; nothing is
    added to the path of a statement that ends normally.
    """

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None:
            return
        if not issubclass(exc_type, Exception):
            self.wrapper._after_interruption()  # type: ignore[attr-defined]
        super().__exit__(exc_type, exc_value, traceback)
