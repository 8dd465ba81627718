"""``OPTIONS["POOL_MODE"] = "transaction"``: a wrapper holds a connection only while it uses one.

In session mode (the default) a Django ``DatabaseWrapper`` keeps the pooled
connection it checked out until Django closes it (end of request). In
transaction mode it gives the connection back to the pool as soon as it needs
none, and checks one out again at its next statement. A use ends:

* after each statement run in autocommit outside ``atomic()``, whether it
  succeeds, fails or is interrupted (a caught ``gevent.Timeout``: a connection
  the interruption left busy goes back at once, to be closed);
* when the outermost ``atomic()`` block ends, after its ``on_commit`` callbacks
  (Django turns autocommit back on and runs them there; also when one raises),
  and when ``set_autocommit(True)`` ends a manual transaction;
* after ``is_usable()``'s test statement;
* when the last open server-side cursor is closed.

The connection then goes back when the greenlet next waits on anything (a hub
callback queued at the end of the use runs before any other greenlet does), so
statements that follow each other without a wait share one checkout, as in
session mode, and a greenlet that waits (an HTTP call, a sleep, a lock) holds
nothing. No other greenlet can tell the difference from an immediate release.

It keeps the connection while a transaction is open (``atomic()``, autocommit
off), while a server-side cursor (``QuerySet.iterator()``) is open, and for the
rest of the wrapper's checkout once code outside Django and this package has
read the raw driver connection (``connection.connection``): such code may keep
using it, so the wrapper must not hand it to another greenlet.

Guarantees kept from session mode: the cap, ``POOL_TIMEOUT``, the health check
and every return guarantee (a release is an ordinary `ConnectionPool.checkin`).
A cursor taken before a release stays usable: the rows of its last statement
stay readable, and its next ``execute()`` runs on whatever connection the
wrapper holds then. ``connection_created`` is sent once per *server*
connection, when the pool opens it (not at every checkout), with the wrapper
pointing at that connection, so receivers that set up the session still do it
exactly where it lasts.
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import connections
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.signals import connection_created
from django.utils.connection import ConnectionDoesNotExist
from gevent import get_hub, spawn

if TYPE_CHECKING:
    # What the mixins are mixed into: Django's PostgreSQL wrapper (checked with django-stubs).
    from django.db.backends.postgresql.base import DatabaseWrapper as _MixinBase
else:
    _MixinBase = object

__all__ = ["POOL_MODES", "SESSION", "TRANSACTION", "PoolModeMixin", "PoolModeSwitch"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

SESSION = "session"
TRANSACTION = "transaction"
POOL_MODES = (SESSION, TRANSACTION)

# Code in these packages reads ``wrapper.connection`` as part of running a
# statement; any other reader may keep the raw connection, so it pins it.
_INTERNAL_MODULES = ("django.", "django_db_geventpool.")
_PROXY_MODULE = "django.utils.connection"
# libpq's PQTRANS_ACTIVE: a command is in progress on the connection.
_ACTIVE = 1
# What an interrupted query leaves behind (libpq numbering: ACTIVE, UNKNOWN).
_INTERRUPTED = frozenset({_ACTIVE, 4})

# Cursor methods that run I/O on the cursor's connection without going through
# execute(): they must run on the connection the wrapper holds now, and keep it.
_IO_METHODS = frozenset(["copy", "copy_expert", "copy_from", "copy_to", "stream", "scroll"])


class _ReleasingCursor:
    """Mixed into Django's cursor wrapper classes for a transaction-mode checkout.

    ``_lease`` is the checkout the driver cursor was made on; a cursor whose
    wrapper has since given that connection back makes a new driver cursor on
    the connection checked out now before its next statement.
    """

    _lease: Any = None
    _server_side = False

    def _attach(self) -> None:
        db = self.db
        if self._lease is not None and db._pool_lease is self._lease:
            return
        db.ensure_connection()
        with db.wrap_database_errors:
            cursor = db.create_cursor()
        previous, self.cursor = self.cursor, cursor  # type: ignore[has-type]
        self._lease = db._pool_lease
        try:
            previous.close()
        except Exception:  # an old result's cursor: nothing to clean up on the server
            pass

    def _attach_pinned(self) -> None:
        """Before COPY and the like: their I/O is not a statement we see end, so the
        checkout stays with the wrapper until it is closed (as raw access does)."""
        self._attach()
        self.db._raw_pinned = True

    def __getattr__(self, attr: str) -> Any:
        if attr in _IO_METHODS:
            self._attach_pinned()
        return super().__getattr__(attr)  # type: ignore[misc]

    def execute(self, sql: Any, params: Any = None) -> Any:
        return self._run(super().execute, sql, params)  # type: ignore[misc]

    def executemany(self, sql: Any, param_list: Any) -> Any:
        return self._run(super().executemany, sql, param_list)  # type: ignore[misc]

    def callproc(self, procname: Any, params: Any = None, kparams: Any = None) -> Any:
        return self._run(super().callproc, procname, params, kparams)  # type: ignore[misc]

    def _run(self, method: Any, *args: Any) -> Any:
        db = self.db
        db._in_use += 1
        try:
            self._attach()
            result = method(*args)
        except Exception:
            db._in_use -= 1
            # A failed statement ends its use too.
            db._release_if_idle(None)
            raise
        except BaseException:
            # Interrupted (a gevent.Timeout, a kill).
            db._in_use -= 1
            db._release_after_interruption()
            raise
        db._in_use -= 1
        db._release_if_idle(self)
        return result

    def __iter__(self) -> Any:
        if self._server_side or not self.db._buffers_results:
            return super().__iter__()  # type: ignore[misc]
        return self._rows_across_releases()

    def _rows_across_releases(self) -> Any:
        # Django's __iter__ iterates the driver cursor it starts with; a release
        # between two rows (a wait in the loop) reads the rest into memory and
        # swaps that in (`_FetchedRows`): go on from whichever holds them now.
        with self.db.wrap_database_errors:
            while True:
                source = self.cursor
                for row in source:
                    yield row
                    if self.cursor is not source:
                        break
                else:
                    return

    def close(self) -> None:
        try:
            self.cursor.close()
        finally:
            if self._server_side:
                db = self.db
                cursors = db._server_cursors
                if cursors is not None:
                    cursors.discard(self)
                db._release_if_idle(None)


_releasing_classes: dict[type, type] = {}


def _releasing_class(cls: type) -> type:
    """``cls`` (a Django cursor wrapper class) with `_ReleasingCursor` mixed in; cached."""
    made = _releasing_classes.get(cls)
    if made is None:
        # Methods the class defines itself (Django's debug wrappers define copy()
        # and copy_expert()) bypass __getattr__: attach before them too.
        own = {name: _attaching(name) for name in _IO_METHODS if hasattr(cls, name)}
        made = type("Releasing" + cls.__name__, (_ReleasingCursor, cls), own)
        _releasing_classes[cls] = made
    return made


def _attaching(name: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._attach_pinned()
        # type(self) is the generated class: super() skips to the wrapped class's method.
        return getattr(super(type(self), self), name)(*args, **kwargs)

    method.__name__ = name
    return method


class _FetchedRows:
    """A psycopg2 result read in full before its connection goes back to the pool.

    psycopg2 refuses to fetch from a cursor whose connection is closed, and the
    pool may close a returned connection (expired, over ``REUSE_CONNS``): the
    rows are read first, so they stay readable whatever happens to it.
    Everything but fetching is the driver cursor's.
    """

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self._rows = cursor.fetchall()
        self._pos = 0

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._cursor, attr)

    def fetchone(self) -> Any:
        if self._pos >= len(self._rows):
            return None
        row = self._rows[self._pos]
        self._pos += 1
        return row

    def fetchmany(self, size: int | None = None) -> list[Any]:
        if size is None:
            size = self._cursor.arraysize
        start = self._pos
        self._pos = min(start + size, len(self._rows))
        return self._rows[start : self._pos]

    def fetchall(self) -> list[Any]:
        start, self._pos = self._pos, len(self._rows)
        return self._rows[start:]

    def __iter__(self) -> Any:
        while self._pos < len(self._rows):
            yield self.fetchone()

    def close(self) -> None:
        self._cursor.close()


def _read_rows_now(cursor: Any) -> None:
    """Give ``cursor`` (a Django cursor wrapper) its result's rows in memory (`_FetchedRows`)."""
    raw_cursor = cursor.cursor
    if (
        not isinstance(raw_cursor, _FetchedRows)
        and not raw_cursor.closed
        and raw_cursor.description is not None
    ):
        cursor.cursor = _FetchedRows(raw_cursor)


def _name_of(func: Any) -> str:
    """``module.qualname`` of a function (or its class), for a log line."""
    named = func if hasattr(func, "__qualname__") else type(func)
    return f"{getattr(named, '__module__', '?')}.{named.__qualname__}"


@functools.cache
def _driver_is_psycopg2() -> bool:
    from .drivers import Psycopg2Ops, driver_ops

    return isinstance(driver_ops(), Psycopg2Ops)


class PoolModeSwitch(_MixinBase):
    """What a session-mode wrapper needs of transaction mode: noticing that it is on.

    Transaction mode lives in a subclass of the wrapper's class (`PoolModeMixin`
    first), and a wrapper's class is switched when its alias's ``POOL_MODE``
    says so: at creation, and at the moments a wrapper holds nothing (``connect()``
    and ``get_autocommit()`` with no connection). A session-mode wrapper thus
    runs none of transaction mode's hooks (a property on ``connection``, use
    counters around Django's I/O): its checkout costs what it did before the mode
    existed.
    """

    #: True in the transaction-mode classes (`PoolModeMixin`).
    _transaction_mode = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self._transaction_mode and self._transaction_mode_configured():
            self._switch_mode(transaction=True)

    def _transaction_mode_configured(self) -> bool:
        """True if this alias is set up for transaction mode (no pool needed to say)."""
        if self.alias == NO_DB_ALIAS:
            return False
        options = self.settings_dict.get("OPTIONS") or {}
        return options.get("POOL_MODE") == TRANSACTION

    def _switch_mode(self, *, transaction: bool) -> None:
        """Give this wrapper the class of the other mode; it holds no connection."""
        attributes = self.__dict__
        if transaction:
            raw = attributes.pop("connection", None)
            self.__class__ = _transaction_class(type(self))
            attributes["_raw_connection"] = raw
        else:
            raw = attributes.pop("_raw_connection", None)
            self.__class__ = type(self)._session_class  # type: ignore[attr-defined]
            attributes["connection"] = raw

    def connect(self) -> None:
        if not self._transaction_mode and self._transaction_mode_configured():
            self._switch_mode(transaction=True)
            return self.connect()
        return super().connect()

    def get_autocommit(self) -> bool:
        if (
            not self._transaction_mode
            and self.connection is None
            and self._transaction_mode_configured()
        ):
            # on_commit() or atomic() before any statement: transaction mode says
            # so without checking a connection out.
            self._switch_mode(transaction=True)
            return self.get_autocommit()
        return super().get_autocommit()

    def _end_pool_mode_checkout(self) -> None:
        """Forget what pinned the checkout that ends (nothing in session mode)."""

    def _announce_server_connection(self, raw: Any) -> None:
        """Send ``connection_created`` for a new server connection, the wrapper pointing at it."""
        previous, self.connection = self.connection, raw
        try:
            connection_created.send(
                sender=getattr(type(self), "_session_class", type(self)), connection=self
            )
        finally:
            self.connection = previous


# Session-mode wrapper class -> its transaction-mode subclass.
_transaction_classes: dict[type, type] = {}


def _transaction_class(session_class: type) -> type:
    variant = _transaction_classes.get(session_class)
    if variant is None:
        variant = type(
            session_class.__name__,
            (PoolModeMixin, session_class),
            {"__module__": session_class.__module__, "_session_class": session_class},
        )
        _transaction_classes[session_class] = variant
    return variant


class PoolModeMixin(PoolModeSwitch):
    """The transaction-mode half of `PooledDatabaseWrapperMixin`; see the module docstring."""

    _transaction_mode = True
    #: The session-mode class this one extends (set by `_transaction_class`).
    _session_class: type

    # Class defaults: Django's __init__ need not know these.
    _pool_lease: Any = None
    _raw_connection: Any = None
    # True while the wrapper holds a checkout it gives back after each use.
    _releasing = False
    # True once code outside Django read the raw connection during this checkout.
    _raw_pinned = False
    # Open server-side cursors of this checkout (weak: a cursor dropped without
    # close() no longer pins the connection once collected).
    _server_cursors: weakref.WeakSet[Any] | None = None
    # Uses in progress (a statement, a checkout's set-up): never released meanwhile.
    _in_use = 0
    # The lease whose release is queued in the hub.
    _release_scheduled: Any = None
    # psycopg2: the cursors that ran a statement on this checkout, whose rows are
    # read into memory before it goes back (by id, weakly: a dropped cursor needs
    # nothing; a dict of references costs less per checkout than a WeakSet).
    _cursors_with_rows: dict[int, weakref.ref[Any]] | None = None

    # -- the raw connection: reading it from outside Django pins it -----------

    @property
    def connection(self) -> Any:
        raw = self._raw_connection
        if raw is not None and self._releasing and not self._raw_pinned:
            frame = sys._getframe(1)
            caller = frame.f_globals.get("__name__", "")
            if caller == _PROXY_MODULE and frame.f_back is not None:
                # django.db.connection (a ConnectionProxy) read it for its caller.
                caller = frame.f_back.f_globals.get("__name__", "")
            if not caller.startswith(_INTERNAL_MODULES):
                self._raw_pinned = True
        return raw

    @connection.setter
    def connection(self, value: Any) -> None:
        self._raw_connection = value

    # -- the mode ---------------------------------------------------------------

    # -- Django's hooks -----------------------------------------------------------

    def connect(self) -> None:
        if not self._transaction_mode_configured():
            self._switch_mode(transaction=False)
            return self.connect()
        # Django's connect(), minus what transaction mode does elsewhere:
        # connection_created is sent once per server connection (when the pool
        # opens it), and pooled connections are handed out in autocommit
        # (AUTOCOMMIT=True is required), so there is no autocommit to set.
        self.check_settings()
        self.in_atomic_block = False
        self.savepoint_ids: list[Any] = []
        self.atomic_blocks: list[Any] = []
        self.needs_rollback = False
        settings_dict = self.settings_dict
        self.health_check_enabled = settings_dict["CONN_HEALTH_CHECKS"]
        self.close_at = None
        self.closed_in_transaction = False
        self.errors_occurred = False
        self.health_check_done = True
        # The pool's opener reads the connection parameters itself.
        self.connection = self.get_new_connection({})
        self._releasing = True
        self.autocommit = True
        self._in_use += 1  # the session set-up below may wait on the server
        try:
            self.init_connection_state()
        finally:
            self._in_use -= 1
        self.run_on_commit: list[Any] = []
        # A checkout that nothing uses before the greenlet waits (a cursor made
        # early, ensure_connection()) goes back too; its first use checks out again.
        self._release_if_idle(None)

    def get_autocommit(self) -> bool:
        if self._raw_connection is None and not self.in_atomic_block:
            # Between statements nothing is held and autocommit is on: say so
            # without checking a connection out (on_commit() outside atomic()).
            return True
        return super().get_autocommit()

    def set_autocommit(self, autocommit: bool, *args: Any, **kwargs: Any) -> None:
        was_on = self.autocommit
        try:
            super().set_autocommit(autocommit, *args, **kwargs)
        finally:
            if autocommit and not was_on:
                # The outermost atomic() ended (its on_commit callbacks ran inside
                # super(), and one of them may have raised: the commit is done all
                # the same), or a manual transaction did.
                self._release_if_idle(None)

    # Django's own I/O on the connection outside a cursor statement: the
    # connection is in use meanwhile (a release queued earlier must wait).

    def _set_autocommit(self, autocommit: bool) -> None:
        self._while_in_use(super()._set_autocommit, autocommit)  # type: ignore[misc]

    def _commit(self) -> None:
        self._while_in_use(super()._commit)  # type: ignore[misc]

    def _rollback(self) -> None:
        self._while_in_use(super()._rollback)  # type: ignore[misc]

    def is_usable(self) -> bool:
        usable = self._while_in_use(super().is_usable)
        # Its test statement is a use like any other: it ends here.
        self._release_if_idle(None)
        return usable

    def _while_in_use(self, call: Callable[..., _T], *args: Any) -> _T:
        """``call(*args)``, with the connection counted in use meanwhile."""
        self._in_use += 1
        try:
            return call(*args)
        finally:
            self._in_use -= 1

    def make_cursor(self, cursor: Any) -> Any:
        wrapper = super().make_cursor(cursor)
        if self._releasing:
            self._make_releasing(wrapper, cursor)
        return wrapper

    def make_debug_cursor(self, cursor: Any) -> Any:
        wrapper = super().make_debug_cursor(cursor)
        if self._releasing:
            self._make_releasing(wrapper, cursor)
        return wrapper

    def _make_releasing(self, wrapper: Any, cursor: Any) -> None:
        wrapper.__class__ = _releasing_class(type(wrapper))
        wrapper._lease = self._pool_lease
        if getattr(cursor, "name", None):
            # A server-side cursor lives on this server connection until closed.
            wrapper._server_side = True
            if self._server_cursors is None:
                self._server_cursors = weakref.WeakSet()
            self._server_cursors.add(wrapper)

    # -- giving back ----------------------------------------------------------------

    def _releasable(self) -> bool:
        """True if nothing needs the connection this checkout holds."""
        return not (
            self._in_use
            or not self._releasing
            or self.in_atomic_block
            or not self.autocommit
            or self._raw_pinned
            or self._server_cursors
        )

    def _release_if_idle(self, cursor: Any) -> None:
        """Give the connection back once this greenlet next waits, if nothing needs it then.

        Called when a use ends (a statement, a server-side cursor, a transaction);
        ``cursor`` ran the last statement. The release runs as a hub callback, that
        is as soon as the greenlet waits on anything (an HTTP call, a sleep, a
        lock) and before any other greenlet runs: statements that follow each
        other without a wait share one checkout, as in session mode, and a
        greenlet that waits holds nothing.
        """
        lease = self._pool_lease
        if lease is None:
            return
        if cursor is not None and not cursor._server_side and self._buffers_results:
            # Noted even inside a transaction: the rows of a statement run in
            # atomic() may be read after the block's end gave the connection back.
            # (A server-side cursor pins the connection until it is closed: its
            # rows are never read here, in the hub, where a fetch would block it.)
            cursors = self._cursors_with_rows
            if cursors is None:
                cursors = self._cursors_with_rows = {}
            cursors[id(cursor)] = weakref.ref(cursor)
        if not self._releasable():
            return
        if self._release_scheduled is not lease:
            self._release_scheduled = lease
            get_hub().loop.run_callback(self._release_when_idle, lease)

    def _release_when_idle(self, lease: Any) -> None:
        # Runs in the hub, while the greenlet that holds the lease waits.
        self._release_scheduled = None
        if self._pool_lease is not lease or not self._releasable():
            return  # closed meanwhile, or in use again (its next use schedules anew)
        pool = lease.pool
        try:
            if pool.driver.transaction_status(lease.connection) == _ACTIVE:
                # Talking to the server through a path we do not count: keep it (the
                # next statement's end, or the request end, gives it back).
                return
            cursors = self._cursors_with_rows
            if cursors:
                for ref in cursors.values():
                    cursor = ref()
                    if cursor is not None:
                        _read_rows_now(cursor)
            self._end_pool_mode_checkout()
            self._pool_lease = None
            self.connection = None
            if pool.reset_query or pool.driver.transaction_status(lease.connection) != 0:
                # A return that does I/O (reset query, rollback) cannot run in the hub.
                spawn(pool.checkin, lease)
            else:
                pool.checkin(lease)
        except Exception:
            logger.exception("pool %r: giving a connection back failed", lease.pool.name)

    def _after_interruption(self) -> None:
        # The statement's own wrapper (`_run`) ends the use: `_release_after_interruption`.
        return None

    def _release_after_interruption(self) -> None:
        """End the use of a statement interrupted by a ``gevent.Timeout`` or a kill.

        Outside a transaction the connection goes back now: to be closed if the
        interruption left a query running or the connection closed (the pool
        cancels the query; the next statement checks out another connection), as
        after any statement otherwise. Inside a transaction nothing changes:
        ``atomic()``'s exit (or the request end) gives it back, as in session mode.
        """
        lease = self._pool_lease
        if lease is None or self._in_use or self.in_atomic_block or not self.autocommit:
            return
        driver = lease.pool.driver
        raw = lease.connection
        if driver.is_closed(raw) or driver.transaction_status(raw) in _INTERRUPTED:
            self._end_pool_mode_checkout()
            self._pool_lease = None
            self.connection = None
            lease.pool.checkin(lease)  # may wait (the cancel): after the wrapper let go
        else:
            self._release_if_idle(None)

    @property
    def _buffers_results(self) -> bool:
        return _driver_is_psycopg2()

    def _end_pool_mode_checkout(self) -> None:
        """Forget what pinned the checkout that ends (released or closed)."""
        self._releasing = False
        self._raw_pinned = False
        self._server_cursors = None
        self._cursors_with_rows = None

    def _announce_server_connection(self, raw: Any) -> None:
        """Send ``connection_created`` for a new server connection, the wrapper pointing at it.

        It runs in the pool's connector greenlet, where ``connections[alias]``
        is this wrapper meanwhile: receivers that look the alias up rather than
        use their argument (``django.contrib.postgres`` reads type OIDs through
        ``connections[alias].cursor()``) query the new connection too, instead
        of checking out another one while this one is still being opened.
        """
        previous, self.connection = self._raw_connection, raw
        releasing, self._releasing = self._releasing, False
        try:
            greenlets_own = connections[self.alias]
        except ConnectionDoesNotExist:  # the alias left DATABASES meanwhile
            greenlets_own = None
        connections[self.alias] = self
        execute_wrappers = list(self.execute_wrappers)
        try:
            connection_created.send(sender=self._session_class, connection=self)
        finally:
            if greenlets_own is None:
                del connections[self.alias]
            else:
                connections[self.alias] = greenlets_own
            self.connection = previous
            self._releasing = releasing
        installed = [w for w in self.execute_wrappers if w not in execute_wrappers]
        if installed:
            # Django sends the signal to each wrapper that connects, and some
            # receivers configure that wrapper (django-read-only's write blocker).
            # Here the wrapper is this connect's own: say so rather than let the
            # configuration silently do nothing.
            logger.warning(
                "pool %r: a connection_created receiver installed the execute wrapper(s) %s; "
                "with POOL_MODE='transaction' the signal is sent once per server connection, "
                "on a wrapper of its own, so they wrap no request's statements: install them "
                "per request (connection.execute_wrapper() in a middleware), or use "
                "POOL_MODE='session'",
                self.alias,
                ", ".join(_name_of(wrapper) for wrapper in installed),
            )
