"""A gevent-cooperative connection pool with a hard cap and first-come waiting.

Semantics, which the rest of the package relies on:

* **Hard cap.** At most ``max_size`` connections are open at once, counting those
  being opened. A *slot* is taken before anything yields (a connect, a health
  check), so a burst of greenlets can never open more than the cap.
* **Requests only wait; the pool connects.** A checkout that finds no idle
  connection queues up (first come, first served) for at most ``timeout`` seconds,
  then raises `PoolTimeout`. New connections are opened by *connector* greenlets
  that the pool owns: each holds a slot while it connects, is bounded by its own
  deadline (``connect_timeout``), and hands its connection to the oldest waiter
  (or keeps it idle). A connect that outlives the checkout that asked for it thus
  serves the next waiter, or ends at its deadline and frees its slot. A waiter
  that already timed out is never handed a connection.
* **Connect trouble degrades to waiting.** A failed connect does not fail a
  checkout: it keeps waiting for a returned connection or a later connect. After
  a failure the pool backs off (pool-wide, with jitter) and probes with one
  connect at a time until one succeeds, so it serves with what the server grants
  and grows again when the server allows. A checkout that times out after connect
  failures says so (its `PoolTimeout` names and chains the last connect error).
* **Healthy checkouts.** Every checkout runs a local check that costs no round trip
  (driver state; has the server closed the socket or sent anything?). A connection
  idle longer than ``health_check_delay`` also gets a server round trip, bounded by
  the checkout's deadline. A broken connection is closed and replaced without the
  caller seeing an error. With ``writable_required``, a connection whose server
  reports itself read-only is closed too (and ``read_only_listeners`` are told).
* **Clean returns.** A returned connection is rolled back if it is in a transaction,
  put back in autocommit mode and, optionally, reset with ``reset_query``; one in an
  active or unknown state is closed.
* **Nothing lost.** A connection held by a greenlet that ends without returning it
  is returned when the greenlet ends (gevent ``Greenlet``) or when its owner object
  is garbage collected. After ``fork()`` the child forgets every connection of its
  parent without touching the parent's sockets (see `forking`), and greenlets of the
  parent that resume in the child (a connector, a queued checkout, a round trip)
  leave the child's pool alone (generations: see `ConnectionPool._outdated`).
* **Drain is exact.** After `ConnectionPool.drain` no connection whose connect
  started before it is handed out or kept idle, wherever it was at that moment.
* **Warm and alive.** ``min_size`` connections are opened in the background (with
  jitter) and kept through ``max_idle``; ``keepalive_interval`` gives idle
  connections a round trip at that interval.

The pool knows nothing of Django or of a database driver: the driver-specific
operations come from a `DriverOps` object and connections are opened by the
``opener`` callable given to the pool (or to `ConnectionPool.checkout`). An opener
that gives up without a driver error raises `ConnectUnavailable` (checkouts keep
waiting); ``on_close`` hears of every connection the pool closes. Fork handling is
`forking`'s.
"""

from __future__ import annotations

import logging
import os
import random
import select
import sys
import traceback
import weakref
from collections import Counter, deque
from collections.abc import Callable
from time import monotonic
from typing import Any, Protocol

import gevent
from gevent import getcurrent
from gevent.hub import Waiter as HubWaiter
from gevent.monkey import get_original

from . import forking
from .errors import ConnectTimeout, ConnectUnavailable, PoolClosed, PoolError, PoolTimeout
from .histogram import PoolTimings

__all__ = [
    "ConnectionPool",
    "DriverOps",
    "Lease",
    "PooledConnection",
    "TransactionStatus",
    "STATS_KEYS",
]

logger = logging.getLogger(__name__)

# The zero-timeout socket check must never yield to the hub, so it uses the
# original poll() even when gevent has patched (or removed) select.poll.
_original_poll = get_original("select", "poll")
_POLL_INPUT = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP
# The identity of the OS thread, not of the greenlet (threading may be patched).
_native_thread_id = get_original("_thread", "get_ident")

# Stats keys: names as in psycopg_pool, so dashboards carry over.
POOL_MAX = "pool_max"
POOL_MIN = "pool_min"
POOL_OPENING = "pool_opening"
POOL_SIZE = "pool_size"
POOL_AVAILABLE = "pool_available"
REQUESTS_WAITING = "requests_waiting"
REQUESTS_NUM = "requests_num"
REQUESTS_QUEUED = "requests_queued"
REQUESTS_WAIT_MS = "requests_wait_ms"
REQUESTS_ERRORS = "requests_errors"
REQUESTS_TIMEOUTS = "requests_timeouts"
CONNECTIONS_NUM = "connections_num"
CONNECTIONS_MS = "connections_ms"
CONNECTIONS_ERRORS = "connections_errors"
CONNECTIONS_LOST = "connections_lost"
CONNECTIONS_EXPIRED = "connections_expired"
CONNECTIONS_RECLAIMED = "connections_reclaimed"
CONNECTIONS_LEAKED = "connections_leaked"
RETURNS_BAD = "returns_bad"
CHECKS_ROUNDTRIP = "checks_roundtrip"
CHECKS_KEEPALIVE = "checks_keepalive"
# Times the server refused a connection while the pool had some open: it serves
# with fewer than MAX_CONNS until the server accepts more (one per episode).
CONNECTIONS_CAPPED = "connections_capped"
# Connections closed because their server reported itself read-only.
CONNECTIONS_READ_ONLY = "connections_read_only"

COUNTER_KEYS = (
    REQUESTS_NUM,
    REQUESTS_QUEUED,
    REQUESTS_WAIT_MS,
    REQUESTS_ERRORS,
    REQUESTS_TIMEOUTS,
    CONNECTIONS_NUM,
    CONNECTIONS_MS,
    CONNECTIONS_ERRORS,
    CONNECTIONS_LOST,
    CONNECTIONS_EXPIRED,
    CONNECTIONS_RECLAIMED,
    CONNECTIONS_LEAKED,
    RETURNS_BAD,
    CHECKS_ROUNDTRIP,
    CHECKS_KEEPALIVE,
    CONNECTIONS_CAPPED,
    CONNECTIONS_READ_ONLY,
)
STATS_KEYS = (
    POOL_MAX,
    POOL_MIN,
    POOL_SIZE,
    POOL_AVAILABLE,
    POOL_OPENING,
    REQUESTS_WAITING,
    *COUNTER_KEYS,
)


class TransactionStatus:
    """Transaction states a driver reports, as libpq names them."""

    IDLE = 0
    ACTIVE = 1
    INTRANS = 2
    INERROR = 3
    UNKNOWN = 4

    NAMES = ("IDLE", "ACTIVE", "INTRANS", "INERROR", "UNKNOWN")


class DriverOps(Protocol):
    """What the pool needs to know about a driver's connection objects."""

    #: Exceptions from opening a connection that are worth a retry.
    connect_errors: tuple[type[BaseException], ...]

    def is_closed(self, raw: Any) -> bool: ...
    def fileno(self, raw: Any) -> int: ...
    def transaction_status(self, raw: Any) -> int: ...
    def ping(self, raw: Any) -> None: ...
    def rollback(self, raw: Any) -> None: ...
    def restore_autocommit(self, raw: Any) -> None: ...
    def execute(self, raw: Any, sql: str) -> None: ...
    def close(self, raw: Any) -> None: ...
    def cancel(self, raw: Any) -> None: ...
    def read_only(self, raw: Any) -> bool:
        """True if the server reported itself read-only on ``raw`` (no round trip)."""
        ...


class PooledConnection:
    """A server connection owned by the pool, and what the pool knows of it."""

    __slots__ = (
        "raw",
        "target",
        "generation",
        "created_at",
        "expires_at",
        "last_used",
        "lease",
        "_poller",
        "__weakref__",
    )

    def __init__(
        self,
        raw: Any,
        fileno: int,
        now: float,
        lifetime: float | None,
        target: Any = None,
        generation: int = 0,
    ) -> None:
        self.raw = raw
        self.target = target
        #: The pool's generation when its connect started (see `ConnectionPool.drain`).
        self.generation = generation
        self.created_at = now
        # A little negative jitter, so connections opened together do not all
        # expire (and reconnect) together.
        self.expires_at = None if lifetime is None else now + lifetime * random.uniform(0.9, 1.0)
        self.last_used = now
        self.lease: Lease | None = None
        self._poller = _original_poll()
        self._poller.register(fileno, _POLL_INPUT)

    def socket_has_input(self) -> bool:
        """True if the server sent anything (or closed) while the connection was idle.

        An idle PostgreSQL connection receives nothing unless the server is going
        away (termination notice, EOF), so input means "ask the server".
        """
        return bool(self._poller.poll(0))

    def expired(self, now: float, max_idle: float | None) -> bool:
        """True past its lifetime, or idle for ``max_idle`` seconds (None: idleness not counted).

        The one expiry rule: checkout, return, the sweeper and `ConnectionPool.drain`
        all ask here (each decides whether idleness counts, for MIN_CONNS).
        A connection older than the pool's generation is outdated, not expired: see
        `ConnectionPool._outdated`.
        """
        if self.expires_at is not None and now >= self.expires_at:
            return True
        return max_idle is not None and now - self.last_used >= max_idle


class Lease:
    """One checkout of a `PooledConnection`; give it back with `ConnectionPool.checkin`.

    ``connection`` is the driver's connection object. A lease is valid until it
    is checked in or discarded; giving back a stale lease is a no-op.
    """

    __slots__ = (
        "pool",
        "conn",
        "connection",
        "greenlet",
        "checked_out_at",
        "stack",
        "leak_timer",
        "finalizer",
        "__weakref__",
    )

    def __init__(self, pool: ConnectionPool, conn: PooledConnection, now: float) -> None:
        self.pool = pool
        self.conn = conn
        self.connection = conn.raw
        self.greenlet: gevent.Greenlet | None = None
        self.checked_out_at = now
        self.stack: traceback.StackSummary | None = None
        self.leak_timer: Any = None
        self.finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def active(self) -> bool:
        """True while this lease still owns its connection."""
        return self.conn.lease is self

    def unwatch(self) -> None:
        """Stop watching the holder (greenlet end, owner collected) and stop the leak timer.

        Called once the lease ends: given back, or forgotten after fork.
        """
        if self.greenlet is not None:
            self.greenlet.unlink(self._on_holder_exit)
            self.greenlet = None
        if self.finalizer is not None:
            self.finalizer.detach()
            self.finalizer = None
        if self.leak_timer is not None:
            self.leak_timer.close()
            self.leak_timer = None

    def _on_holder_exit(self, greenlet: gevent.Greenlet) -> None:
        # Runs in the hub when the holding greenlet ends: I/O (a rollback) must
        # happen in a greenlet of its own.
        if self.active:
            gevent.spawn(self.pool._reclaim, self, f"greenlet {greenlet!r} ended")


class _Waiter:
    """A checkout queued for a connection: it waits, and is served or failed once.

    ``_wakeup`` is gevent's low-level hub ``Waiter`` rather than an ``Event``: a
    queued checkout is woken exactly once, from the hub, so it needs no list of
    links, and a waiting checkout costs about a third less CPU (measured with bench/).
    ``opener`` and ``target`` are the checkout's own (used by a connector started
    while it is the oldest waiter), or None for the pool's.

    The outcome is decided by `serve`, `fail` or `cancel`, whichever comes first
    (each says whether it decided): a waiter that gave up is never handed a
    connection, and one that was handed a connection never loses it.
    """

    __slots__ = ("_wakeup", "served", "cancelled", "conn", "error", "opener", "target")

    def __init__(self, opener: Callable[[bool], Any] | None, target: Any) -> None:
        self._wakeup = HubWaiter()
        self.served = False
        self.cancelled = False
        #: What it was served: a connection (with its slot), or an error to raise.
        self.conn: PooledConnection | None = None
        self.error: BaseException | None = None
        self.opener = opener
        self.target = target

    def wait(self, timeout: float) -> None:
        """Sleep until served or failed, or for ``timeout`` seconds; a kill propagates.

        Waking up decides nothing: the caller then tries `cancel`.
        """
        wakeup = self._wakeup
        timer = wakeup.hub.loop.timer(max(timeout, 0.0))
        timer.start(wakeup.switch, None)
        try:
            wakeup.get()
        finally:
            timer.close()

    def serve(self, conn: PooledConnection) -> bool:
        """Hand ``conn`` (and its slot) over; False if the waiter already gave up."""
        return self._settle(conn, None)

    def fail(self, error: BaseException) -> bool:
        """Make the waiting checkout raise ``error``; False if it already gave up."""
        return self._settle(None, error)

    def cancel(self) -> bool:
        """Give up waiting (timed out, killed); False if it was served or failed first."""
        if self.served:
            return False
        self.cancelled = True
        return True

    def _settle(self, conn: PooledConnection | None, error: BaseException | None) -> bool:
        if self.cancelled or self.served:
            return False
        self.served = True
        self.conn = conn
        self.error = error
        # Wake it from the hub, never switching away inside the caller's critical section.
        wakeup = self._wakeup
        wakeup.hub.loop.run_callback(wakeup.switch, None)
        return True


class _RoundTripTimeout(BaseException):
    """A health check or keepalive round trip that got no answer in time (internal)."""


class _InheritedConnector(BaseException):
    """Stops a connector inherited from the parent before it starts a connect (internal)."""


# Frames of the checkout stack kept for a leak report (innermost first): the
# ORM alone takes about 15 under the application's code.
_LEAK_STACK_DEPTH = 64

# Health verdicts at checkout. _INHERITED: the parent's connection, reached by a
# checkout the parent began before fork() (see ConnectionPool._outdated).
_HEALTHY, _EXPIRED, _LOST, _INHERITED = 0, 1, 2, 3

# Pool-wide connect backoff after failures: from CONNECT_RETRY_DELAY (at least
# _MIN_BACKOFF, so a zero delay cannot hammer a down server), doubled per failure
# up to _MAX_BACKOFF, with jitter. The ceiling is also at most half of POOL_TIMEOUT:
# a checkout that waits its whole timeout then always sees a probe start in its
# first half, so a server that is back is found before the checkout gives up.
_MIN_BACKOFF = 0.05
_MAX_BACKOFF = 2.0
# Warm-up connects (MIN_CONNS) start within this many seconds, spread at random.
_WARM_UP_JITTER = 0.5
# How often the maintenance greenlet tops the pool up to MIN_CONNS.
_MIN_CONNS_CHECK = 1.0


class ConnectionPool:
    """A pool of at most ``max_size`` connections, shared by the greenlets of one hub.

    Use `checkout` to get a `Lease`, `checkin` to give it back clean and
    `discard` to give it back broken. All methods must be called from greenlets of
    the OS thread that created the pool.
    """

    def __init__(
        self,
        name: str,
        driver: DriverOps,
        *,
        max_size: int = 4,
        reuse_size: int | None = None,
        timeout: float = 30.0,
        health_check_delay: float | None = 1.0,
        max_lifetime: float | None = 3600.0,
        max_idle: float | None = 600.0,
        leak_timeout: float | None = None,
        connect_retries: int = 1,
        connect_retry_delay: float = 0.1,
        reset_query: str | None = None,
        opener: Callable[[bool], Any] | None = None,
        target_of: Callable[[], Any] | None = None,
        connect_timeout: float | None = None,
        min_size: int = 0,
        keepalive_interval: float | None = None,
        writable_required: bool = False,
        on_close: Callable[[Any], None] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.name = name
        self.driver = driver
        self.max_size = max_size
        self.reuse_size = max_size if reuse_size is None else min(reuse_size, max_size)
        self.timeout = timeout
        self.health_check_delay = health_check_delay
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.leak_timeout = leak_timeout
        self.connect_retries = connect_retries
        self.connect_retry_delay = connect_retry_delay
        self.reset_query = reset_query
        #: Opens a driver connection (``opener(reconnect)``) in a connector greenlet.
        self.opener = opener
        #: What a connection opened by ``opener`` now is connected to (see `checkout`).
        self.target_of: Callable[[], Any] = target_of or _no_target
        #: Bound on one connect (the opener's whole call): never a slot held forever.
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        # MIN_CONNS as configured; min_size follows resize() up to it and back.
        self._min_size_configured = min_size
        self.min_size = min(min_size, max_size)
        self.keepalive_interval = keepalive_interval
        self.writable_required = writable_required
        #: Called with each driver connection the pool has closed (after the close).
        self.on_close = on_close
        #: Called with the driver connection when its server reports read-only.
        self.read_only_listeners: list[Callable[[Any], None]] = []

        # Slots taken by connections in use, handed over, or being opened by a
        # connector. Idle connections hold no slot; slots + idle never exceeds max_size.
        self._slots_used = 0
        # Idle connections, most recently used last (LIFO reuse keeps few hot).
        self._idle: deque[PooledConnection] = deque()
        # Queued checkouts, oldest first; cancelled ones are skipped lazily.
        # Waiters are served a connection, or failed with an error (see _Waiter).
        self._waiters: deque[_Waiter] = deque()
        self._waiting = 0
        self._in_use: set[Lease] = set()
        # Every connection opened and not closed yet: idle, in use, or in transit (being
        # handed over, checked, reset). After fork() the child detaches all of them.
        self._open_conns: set[PooledConnection] = set()
        self._stats: Counter[str] = Counter()
        self._closed = False
        self._pid = os.getpid()
        self._thread_id = _native_thread_id()
        # Generations: `drain` and `forget_after_fork` each start a new one. A connection
        # carries the generation in which its connect started; one older than the current
        # generation is never made idle nor handed out (see `_outdated`). Generations
        # below ``_born`` belong to the parent process (before the last fork): a greenlet
        # or a connection from there is the parent's, and touches nothing here.
        self._generation = 0
        self._born = 0
        self._sweeper: gevent.Greenlet | None = None
        # Connector greenlets running (each holds one of _slots_used).
        self._connecting = 0
        self._connectors: set[gevent.Greenlet] = set()
        # Pool-wide connect backoff: consecutive failed connects, when the next
        # connect may start, and the timer that starts it.
        self._connect_failures = 0
        self._backoff_rounds = 0
        self._retry_at = 0.0
        self._retry_timer: Any = None
        self._last_connect_error: BaseException | None = None
        self._last_connect_error_at = 0.0
        self._last_failed_attempt_at = -1.0
        # The next connect replaces a broken connection: reconnect hooks run.
        self._reconnect_pending = False
        # True while the server grants fewer connections than max_size (logged once).
        self._capped = False
        # Extra live measures merged into get_stats() (see add_stats_source).
        self._stats_sources: list[Callable[[], dict[str, int]]] = []
        # Wait, use and connect times (histogram.py); their p50/p99 join get_stats().
        self.timings = PoolTimings()
        self._stats_sources.append(self.timings.stats)
        forking.track_pool(self)
        logger.info(
            "pool %r created: max_size=%d reuse_size=%d min_size=%d timeout=%.1fs",
            name,
            max_size,
            self.reuse_size,
            self.min_size,
            timeout,
        )
        if self.min_size or keepalive_interval is not None:
            self._ensure_sweeper()
        if self.min_size and opener is not None:
            # Warm up in the background, from the hub: never on a request's path.
            gevent.get_hub().loop.run_callback(self._grow)

    # -- checkout -----------------------------------------------------------

    def checkout(
        self,
        open_connection: Callable[[bool], Any] | None = None,
        timeout: float | None = None,
        owner: object | None = None,
        target: Any = None,
    ) -> Lease:
        """Return a `Lease` on a healthy connection, or raise within ``timeout``.

        New connections are opened by connector greenlets with
        ``open_connection(reconnect)`` if given, else with the pool's ``opener``;
        ``reconnect`` is true when a connect replaces a broken connection or
        follows a failed connect. ``owner``, if given, is an object whose garbage
        collection gives the connection back (used when the holder is not a gevent
        ``Greenlet``). ``target`` tells what the connection must be connected to
        (server, database, user): a connection opened for another target is closed.
        Raises `PoolTimeout` after ``timeout`` seconds (default: the pool's), with
        the last connect error chained if connects were failing; `PoolClosed` if
        the pool is closed; or an error the opener raised that is not a connect
        error (a failing reconnect hook, say).
        """
        if self._thread_id != _native_thread_id():
            raise PoolError(
                f"pool {self.name!r} was created in another OS thread; a pool serves the "
                "greenlets of one thread. Run gevent.monkey.patch_all() first so that "
                "threads are greenlets, or serve this thread with Django's own backend."
            )
        started = monotonic()
        self._stats[REQUESTS_NUM] += 1
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        # Critical section: take an idle connection (and a slot for it) now, unless
        # earlier checkouts are queued (first come, first served).
        if self._idle and not self._waiting:
            self._slots_used += 1
            conn: PooledConnection | None = self._idle.pop()
        else:
            conn = None
        deadline = started + (self.timeout if timeout is None else timeout)
        first_in_line = False
        waits = 0
        lost = 0
        while True:
            if conn is None:
                conn = self._wait(deadline, started, open_connection, target, first_in_line, waits)
                waits += 1
            # This checkout owns a slot and conn from here on: any failure frees both.
            try:
                if conn.target == target:
                    verdict = self._check(conn, deadline, not lost)
                else:
                    verdict = _EXPIRED
            except BaseException:
                # Killed during the round trip: the connection's state is unknown.
                if conn.generation >= self._born:
                    self._stats[REQUESTS_ERRORS] += 1
                self._close_and_release(conn)
                raise
            if verdict == _HEALTHY:
                lease = self._lend(conn, owner)
                self.timings.wait_time.record(lease.checked_out_at - started)
                return lease
            if verdict == _INHERITED:
                raise self._inherited(conn)
            if verdict == _LOST:
                self._reconnect_pending = True
                lost += 1
            self._close_quietly(conn)
            # Critical section: another idle connection may serve instead; else the
            # slot goes to a connector and this checkout waits first in line. Not
            # past the deadline (a frozen server spent it): a round trip with no time
            # left would fail, and discard, a healthy connection.
            if self._idle and monotonic() < deadline:
                conn = self._idle.pop()
                continue
            conn = None
            self._slots_used -= 1
            first_in_line = True

    def _wait(
        self,
        deadline: float,
        started: float,
        opener: Callable[[bool], Any] | None,
        target: Any,
        first_in_line: bool,
        waits: int,
    ) -> PooledConnection:
        """Queue up until a connection is handed over; `PoolTimeout` at ``deadline``.

        ``waits``: how often this checkout waited before (it lost what it was
        served): a checkout counts once in ``requests_queued``, and its waits add
        up in ``requests_wait_ms``.
        """
        wait_started = monotonic()
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        generation = self._generation
        waiter = _Waiter(opener, target)
        if first_in_line:
            # It was served before, and lost what it got (broken, expired).
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        self._waiting += 1
        if not waits:
            self._stats[REQUESTS_QUEUED] += 1
        self._grow()
        try:
            waiter.wait(deadline - monotonic())
        except BaseException:
            # Killed or interrupted while queued: never lose what was handed over.
            if generation >= self._born:
                self._abandon(waiter)
            elif waiter.conn is not None:
                self._forget_inherited(waiter.conn.raw)
            raise
        if generation < self._born:
            # Queued in the parent before fork(): this process never counted it.
            raise self._inherited(waiter.conn)
        now = monotonic()
        self._stats[REQUESTS_WAIT_MS] += int((now - wait_started) * 1000)
        waited_ms = int((now - started) * 1000)
        if waiter.cancel():
            # Critical section: nobody served us in time, and now nobody will.
            self._waiting -= 1
            self._stats[REQUESTS_ERRORS] += 1
            self._stats[REQUESTS_TIMEOUTS] += 1
            raise self._timeout_error(waited_ms, started)
        if waiter.error is not None:
            if not isinstance(waiter.error, PoolClosed):
                self._stats[REQUESTS_ERRORS] += 1
            raise waiter.error
        conn = waiter.conn
        assert conn is not None
        if conn.generation != self._generation:
            # Drained after it was handed over: `_check` closes it, and the checkout
            # waits again, first in line.
            conn.expires_at = monotonic()
        return conn

    def _timeout_error(self, waited_ms: int, started: float) -> PoolTimeout:
        message = (
            f"pool {self.name!r}: no connection available after {waited_ms / 1000:.2f}s "
            f"(MAX_CONNS={self.max_size}, {self._slots_used - self._connecting} in use, "
            f"{self._connecting} being opened, {self._waiting} other checkouts waiting)"
        )
        cause = self._last_connect_error
        if cause is not None and (self._connect_failures or self._last_connect_error_at >= started):
            # Connects were failing: that, not the load, is what operators must see.
            error_text = " ".join(str(cause).split()) or type(cause).__name__
            message += (
                f"; connects to the server are failing, last error "
                f"{monotonic() - self._last_connect_error_at:.1f}s ago: {error_text}"
            )
        elif self._connecting and self._slots_used == self._connecting and not self._idle:
            # Nothing in use: every slot is a connect the server has not answered yet.
            cause = None
            message += (
                "; the server has not answered the connects yet (unreachable, or slow "
                "to accept: see connect_timeout)"
            )
        else:
            cause = None
            message += "; raise MAX_CONNS or POOL_TIMEOUT, or give connections back sooner"
        logger.warning("%s", message)
        error = PoolTimeout(message)
        error.__cause__ = cause
        return error

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.cancel():
            self._waiting -= 1
        elif waiter.conn is not None:
            # We own a slot and a connection: pass them on untouched.
            self._give_back_idle(waiter.conn)

    def _check(
        self, conn: PooledConnection, deadline: float | None = None, spare: bool = False
    ) -> int:
        """The verdict on ``conn`` before it is handed out; a round trip ends by ``deadline``.

        ``spare``: while other idle connections could serve instead, the round trip
        gets half of the time left, so that one frozen backend (a connection a
        firewall now drops, a stopped backend) costs its own connection, not the
        request: the next idle connection is checked with the other half.
        """
        now = monotonic()
        # Idle past MAX_IDLE still serves while the pool holds no more than MIN_CONNS.
        # (Inlined: this runs at every checkout.)
        keep_min = self.min_size and self._slots_used + len(self._idle) <= self.min_size
        max_idle = None if keep_min else self.max_idle
        if conn.expired(now, max_idle):
            self._stats[CONNECTIONS_EXPIRED] += 1
            logger.debug("pool %r: closing expired connection %r", self.name, conn.raw)
            return _EXPIRED
        raw = conn.raw
        if self.driver.is_closed(raw):
            return self._lost(conn, "closed by the driver")
        delay = self.health_check_delay
        if conn.socket_has_input() or (delay is not None and now - conn.last_used >= delay):
            self._stats[CHECKS_ROUNDTRIP] += 1
            # Bounded: a frozen server must not hold the checkout past its deadline.
            limit = self.timeout if deadline is None else max(deadline - now, 0.001)
            if spare and self._idle:
                limit /= 2
            failure = self._round_trip(raw, limit, "health check")
            # It yielded: a drain or a fork may have happened meanwhile.
            if conn.generation != self._generation:
                return self._outdated(conn)
            if failure is not None:
                return self._lost(conn, failure)
        if self.writable_required and self.driver.read_only(raw):
            return self._read_only(conn)
        return _HEALTHY

    def _round_trip(self, raw: Any, limit: float, what: str) -> str | None:
        """Ping ``raw`` within ``limit`` seconds: None if it answered, else why it failed."""
        expired = _RoundTripTimeout()
        try:
            with gevent.Timeout(limit, expired):
                self.driver.ping(raw)
        except _RoundTripTimeout as exc:
            if exc is not expired:
                raise
            return f"no answer to the {what} in {limit:.2f}s"
        except Exception as exc:
            return f"{what} failed: {exc}".strip()
        return None

    def _outdated(self, conn: PooledConnection) -> int:
        """Verdict on a connection older than the pool's generation: drained, or inherited.

        A drained one is closed like an expired one (`_EXPIRED`); one of the parent
        process (`_INHERITED`) must be left alone by the greenlet holding it, itself
        inherited from the parent.
        """
        if conn.generation < self._born:
            return _INHERITED
        self._stats[CONNECTIONS_EXPIRED] += 1
        logger.debug("pool %r: closing drained connection %r", self.name, conn.raw)
        return _EXPIRED

    def _forget_inherited(self, raw: Any) -> None:
        """Leave a parent's connection, reached by a greenlet inherited through fork(), alone.

        No slot, count or waiter of this process is touched; its socket is detached
        and its driver object kept alive, as `forget_after_fork` does with the
        connections it finds (see `forking`).
        """
        try:
            fileno: int | None = self.driver.fileno(raw)
        except Exception as exc:  # a driver object the parent had closed
            logger.debug("pool %r: no descriptor after fork: %s", self.name, exc)
            fileno = None
        forking.keep_inherited_alive(raw, fileno)

    def _inherited(self, conn: PooledConnection | None) -> PoolError:
        """The error that ends a checkout the parent process began before fork()."""
        if conn is not None:
            self._forget_inherited(conn.raw)
        return PoolError(
            f"pool {self.name!r}: this checkout began in the parent process before fork(); "
            "the child does not serve it"
        )

    def _lost(self, conn: PooledConnection, why: str) -> int:
        self._stats[CONNECTIONS_LOST] += 1
        logger.warning("pool %r: discarding broken connection (%s)", self.name, why)
        return _LOST

    def _read_only(self, conn: PooledConnection) -> int:
        """A connection whose server now refuses writes: closed, and listeners told."""
        self._stats[CONNECTIONS_READ_ONLY] += 1
        logger.warning(
            "pool %r: discarding a connection whose server reports itself read-only "
            "(a writable server is required)",
            self.name,
        )
        for listener in self.read_only_listeners:
            try:
                listener(conn.raw)
            except Exception:
                logger.exception("pool %r: read-only listener failed", self.name)
        return _LOST

    # -- connecting -----------------------------------------------------------

    def _total_size(self) -> int:
        return self._slots_used + len(self._idle)

    def _grow(self) -> None:
        """Start connectors for the waiters no connector covers yet, and up to min_size.

        Never yields. While connects fail, at most one connector runs (a probe),
        and only once the pool-wide backoff has passed.
        """
        if self._closed or self._pid != os.getpid():
            return
        # Critical section: decide how many connectors to start, and take their slots.
        wanted = max(self._waiting - self._connecting, self.min_size - self._total_size())
        wanted = min(wanted, self.max_size - self._total_size())
        if wanted <= 0:
            return
        if self._connect_failures:
            now = monotonic()
            if now < self._retry_at:
                self._schedule_retry(self._retry_at - now)
                return
            wanted = min(wanted, 1 - self._connecting)
            if wanted <= 0:
                return
        opener, target = self._opener_for_next()
        if opener is None:
            return
        for _ in range(wanted):
            reconnect = self._reconnect_pending or self._connect_failures > 0
            self._reconnect_pending = False
            self._slots_used += 1
            self._connecting += 1
            # Warm-up connects (nobody waiting) are spread out in time.
            jitter = 0.0 if self._waiting else random.uniform(0.0, _WARM_UP_JITTER)
            connector = gevent.spawn(
                self._connector, opener, reconnect, target, jitter, self._generation
            )
            self._connectors.add(connector)

    def _opener_for_next(self) -> tuple[Callable[[bool], Any] | None, Any]:
        # The oldest waiter's own opener if it brought one, else the pool's.
        for waiter in self._waiters:
            if not waiter.cancelled and waiter.opener is not None:
                return waiter.opener, waiter.target
            if not waiter.cancelled:
                break
        if self.opener is None:
            return None, None
        return self.opener, self.target_of()

    def _schedule_retry(self, delay: float) -> None:
        if self._retry_timer is not None:
            return
        timer = gevent.get_hub().loop.timer(delay)
        self._retry_timer = timer

        def fire() -> None:
            timer.close()
            if self._retry_timer is timer:
                self._retry_timer = None
            self._grow()

        timer.start(fire)

    def _connector(
        self,
        opener: Callable[[bool], Any],
        reconnect: bool,
        target: Any,
        jitter: float,
        spawned_in: int,
    ) -> None:
        """Open one connection on a slot taken by `_grow`; hand it to the oldest waiter.

        ``spawned_in`` is the pool's generation when `_grow` took the slot: a connector
        the parent started before fork() (older than ``_born``) touches nothing of
        the child's pool when it resumes in the child.
        """
        try:
            if jitter:
                gevent.sleep(jitter)
            started = monotonic()
            conn = self._open(opener, reconnect, target, spawned_in)
        except BaseException as exc:
            if spawned_in < self._born:
                return  # the parent's connector: the child never counted it
            self._connecting -= 1
            self._slots_used -= 1
            self._connectors.discard(getcurrent())
            if isinstance(exc, gevent.GreenletExit) or self._closed:
                return
            self._connect_failed(exc)
            self._grow()
            return
        self._connecting -= 1
        self._connectors.discard(getcurrent())
        if self._connect_failures and self._last_connect_error_at >= started:
            # The server accepted this connect but refused one made meanwhile: it
            # grants fewer connections than max_size (a connection limit).
            self._note_capped()
        else:
            self._connect_succeeded()
        self._give_back_idle(conn)
        self._grow()

    def _connect_failed(self, exc: BaseException) -> None:
        now = monotonic()
        self._last_connect_error = exc
        self._last_connect_error_at = now
        self._connect_failures += 1
        if self._backoff_rounds == 0 or now >= self._retry_at:
            # A new round: connects that fail together (a burst started before the
            # first failure was known) count as one, so the delay doubles per probe.
            self._backoff_rounds += 1
            base = max(self.connect_retry_delay, _MIN_BACKOFF)
            ceiling = max(base, min(_MAX_BACKOFF, self.timeout / 2))
            delay = min(base * 2 ** (self._backoff_rounds - 1), ceiling)
            self._retry_at = now + delay * random.uniform(0.5, 1.0)
        delay = self._retry_at - now
        error_text = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, self._degrading_errors()):
            # Not the server's doing (a failing hook, a bad setting): the oldest
            # waiter gets it rather than a PoolTimeout much later.
            logger.warning("pool %r: opening a connection failed: %s", self.name, error_text)
            self._hand_over(exc)
            return
        if self._slots_used - self._connecting + len(self._idle) > 0:
            self._note_capped()
        if not self._capped:
            logger.warning(
                "pool %r: connect failed (%s); next attempt in %.2fs, requests keep waiting",
                self.name,
                error_text,
                delay,
            )

    def _note_capped(self) -> None:
        """The server refuses more connections while some are open: say so, once."""
        if self._capped:
            return
        self._capped = True
        self._stats[CONNECTIONS_CAPPED] += 1
        error = self._last_connect_error
        error_text = " ".join(str(error).split()) or type(error).__name__
        logger.warning(
            "pool %r: the server refused a connection with %d of MAX_CONNS=%d open (%s); "
            "requests queue on those until it accepts more",
            self.name,
            self._slots_used - self._connecting + len(self._idle),
            self.max_size,
            error_text,
        )

    def _connect_succeeded(self) -> None:
        if self._connect_failures:
            logger.info(
                "pool %r: connected again after %d failed attempts",
                self.name,
                self._connect_failures,
            )
        self._connect_failures = 0
        self._backoff_rounds = 0
        self._capped = False

    def _degrading_errors(self) -> tuple[type[BaseException], ...]:
        return (*self.driver.connect_errors, ConnectTimeout, ConnectUnavailable)

    def _open(
        self,
        open_connection: Callable[[bool], Any],
        reconnect: bool,
        target: Any,
        spawned_in: int,
    ) -> PooledConnection:
        """Open one connection, retrying quickly up to ``connect_retries`` times.

        Runs in a connector greenlet; each attempt is bounded by ``connect_timeout``.
        Quick retries stop as soon as another connector has failed: the pool-wide
        backoff then decides when to try again. The connection carries the
        generation in which its successful attempt started (a connect begun before
        a `drain` is outdated). A connector of the parent (``spawned_in`` older than
        ``_born``) starts no attempt in a forked child.
        """
        stats = self._stats
        delay = self.connect_retry_delay
        attempt = 0
        while True:
            if spawned_in < self._born:
                raise _InheritedConnector()
            generation = self._generation
            stats[CONNECTIONS_NUM] += 1
            started = monotonic()
            expired = ConnectTimeout(
                f"pool {self.name!r}: opening a connection took more than "
                f"{self.connect_timeout:.1f}s"
            )
            try:
                with gevent.Timeout(self.connect_timeout, expired):
                    raw = open_connection(reconnect or attempt > 0)
            except self._degrading_errors() as exc:
                if spawned_in < self._born:
                    raise
                if isinstance(exc, ConnectUnavailable) and not exc.attempted:
                    # The opener gave up before trying any server: no attempt.
                    stats[CONNECTIONS_NUM] -= 1
                    raise
                stats[CONNECTIONS_ERRORS] += 1
                # Quick retries only while no other connect failed meanwhile: past
                # that, the pool-wide backoff decides when to try again.
                others_failed = self._connect_failures or self._last_failed_attempt_at >= started
                self._last_failed_attempt_at = monotonic()
                if attempt >= self.connect_retries or self._closed or others_failed:
                    raise
                attempt += 1
                pause = delay * random.uniform(0.5, 1.0)
                logger.warning(
                    "pool %r: connect failed (%s); retry %d of %d in %.2fs",
                    self.name,
                    str(exc).strip(),
                    attempt,
                    self.connect_retries,
                    pause,
                )
                gevent.sleep(pause)
                delay *= 2
                continue
            except BaseException:
                if spawned_in >= self._born:
                    stats[CONNECTIONS_ERRORS] += 1
                raise
            if spawned_in < self._born:
                # A fork happened during the connect, which began in the parent on a
                # socket the parent shares: the parent's, never used nor closed here.
                self._forget_inherited(raw)
                raise _InheritedConnector()
            now = monotonic()
            stats[CONNECTIONS_MS] += int((now - started) * 1000)
            self.timings.create_time.record(now - started)
            try:
                conn = PooledConnection(
                    raw, self.driver.fileno(raw), now, self.max_lifetime, target, generation
                )
            except BaseException:
                self._close_raw(raw)
                raise
            self._open_conns.add(conn)
            logger.debug("pool %r: opened connection %r", self.name, raw)
            self._ensure_sweeper()
            return conn

    def _lend(self, conn: PooledConnection, owner: object | None) -> Lease:
        now = monotonic()
        lease = Lease(self, conn, now)
        conn.lease = lease
        self._in_use.add(lease)
        holder = getcurrent()
        if isinstance(holder, gevent.Greenlet):
            lease.greenlet = holder
            holder.rawlink(lease._on_holder_exit)
        elif owner is not None:
            lease.finalizer = weakref.finalize(owner, _reclaim_collected, weakref.ref(lease))
        if self.leak_timeout is not None:
            # Frames only, no source lines: those are read if a leak is reported.
            # Deep enough to get past the ORM to the code that checked it out.
            lease.stack = traceback.StackSummary.extract(
                traceback.walk_stack(sys._getframe(2)), limit=_LEAK_STACK_DEPTH, lookup_lines=False
            )
            lease.stack.reverse()
            lease.leak_timer = gevent.get_hub().loop.timer(self.leak_timeout)
            lease.leak_timer.start(self._report_leak, lease)
        logger.debug("pool %r: checked out %r", self.name, conn.raw)
        return lease

    # -- return -------------------------------------------------------------

    def checkin(self, lease: Lease) -> None:
        """Give a connection back; it is reset, then reused or closed.

        A stale lease (already given back, or reclaimed) is ignored.
        """
        conn = self._end_lease(lease)
        if conn is None:
            return
        clean: bool | None = False
        try:
            clean = self._reset(conn)
        finally:
            # Not clean, or killed during the rollback or reset (it yields): its
            # state is unknown either way. None: a canceller took it (and its slot).
            if not clean:
                if conn.generation >= self._born:
                    self._stats[RETURNS_BAD] += 1
                if clean is not None:
                    self._close_and_release(conn)
        if clean:
            self._give_back_idle(conn)

    def discard(self, lease: Lease) -> None:
        """Give a connection back to be closed (broken, or in unknown state)."""
        conn = self._end_lease(lease)
        if conn is None:
            return
        self._close_and_release(conn)

    def _end_lease(self, lease: Lease) -> PooledConnection | None:
        conn = lease.conn
        if conn.lease is not lease:
            return None
        conn.lease = None
        self._in_use.discard(lease)
        self.timings.use_time.record(monotonic() - lease.checked_out_at)
        lease.unwatch()
        logger.debug("pool %r: returned %r", self.name, conn.raw)
        return conn

    def _reset(self, conn: PooledConnection) -> bool | None:
        """Leave the connection idle and in autocommit; False if it must be closed.

        None: a query still runs; a greenlet of its own cancels it, then closes the
        connection and frees its slot.
        """
        driver, raw = self.driver, conn.raw
        if driver.is_closed(raw):
            return False
        status = driver.transaction_status(raw)
        if status != TransactionStatus.IDLE:
            name = TransactionStatus.NAMES[status]
            if status not in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                logger.warning("pool %r: closing connection returned in %s state", self.name, name)
                if status == TransactionStatus.ACTIVE:
                    # Not in the caller, an interrupted one: the cancel waits on the
                    # server (seconds, if it is frozen). The slot stays taken until
                    # the backend is gone.
                    gevent.spawn(self._cancel_and_close, conn, self._pid)
                    return None
                return False
            logger.warning(
                "pool %r: connection returned in %s state; rolling back", self.name, name
            )
            try:
                driver.rollback(raw)
            except Exception as exc:
                logger.warning(
                    "pool %r: rollback failed, closing the connection: %s", self.name, exc
                )
                return False
        try:
            driver.restore_autocommit(raw)
            if self.reset_query:
                driver.execute(raw, self.reset_query)
        except Exception as exc:
            logger.warning("pool %r: reset failed, closing the connection: %s", self.name, exc)
            return False
        if self.writable_required and driver.read_only(raw):
            # The server turned read-only while it was in use (the report came with
            # a statement's answer, maybe a refused write): never hand it out again.
            self._read_only(conn)
            return False
        return True

    def _give_back_idle(self, conn: PooledConnection) -> None:
        """Hand a connection (and its slot) to the oldest waiter, else keep it idle or close it.

        Every connection becomes idle or is handed over here (checkin, connector,
        keepalive, an abandoned hand-over): an outdated one (drained, or the parent's
        after fork) never passes.
        """
        if conn.generation != self._generation:
            if conn.generation < self._born:
                self._forget_inherited(conn.raw)  # no slot of this process to free
            else:
                self._stats[CONNECTIONS_EXPIRED] += 1
                self._close_and_release(conn)
            return
        now = monotonic()
        conn.last_used = now
        # Critical section: hand the connection to the oldest waiter, else keep
        # it idle (up to reuse_size, and only if it has not outlived its lifetime).
        # After resize() shrank the cap, connections beyond it are closed instead.
        if self._slots_used + len(self._idle) > self.max_size:  # _total_size(), inlined
            self._close_and_release(conn)
            return
        if not self._closed and not conn.expired(now, None):
            if self._hand_over(conn):
                return
            if len(self._idle) < self.reuse_size:
                self._slots_used -= 1
                self._idle.append(conn)
                return
        else:
            self._stats[CONNECTIONS_EXPIRED] += 1
        self._close_and_release(conn)

    def _close_and_release(self, conn: PooledConnection) -> None:
        """Close a connection that holds a slot, and free the slot.

        The parent's connection, reached by a greenlet inherited through fork(), holds
        no slot here and is left alone.
        """
        if conn.generation < self._born:
            self._forget_inherited(conn.raw)
            return
        self._close_quietly(conn)
        self._release_slot()

    def _release_slot(self) -> None:
        """Free one slot (its connection already closed); waiters get a connector."""
        if self._slots_used <= 0:
            raise AssertionError(f"pool {self.name!r}: slot released more often than taken")
        self._slots_used -= 1
        self._grow()

    def _hand_over(self, outcome: PooledConnection | BaseException) -> bool:
        """Serve the oldest waiter that has not given up (a connection, or an error to raise).

        False if no waiter took it.
        """
        # Critical section: no yield until a waiter has taken it.
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if isinstance(outcome, BaseException):
                accepted = waiter.fail(outcome)
            else:
                accepted = waiter.serve(outcome)
            if accepted:
                self._waiting -= 1
                return True
        return False

    def _reclaim(self, lease: Lease, why: str) -> None:
        """Take back a connection whose holder is gone without returning it."""
        if not lease.active:
            return
        self._stats[CONNECTIONS_RECLAIMED] += 1
        logger.info(
            "pool %r: %s without giving its connection back; returning it "
            "(wrap such code in django_db_geventpool.utils.close_connection)",
            self.name,
            why,
        )
        self.checkin(lease)

    def _report_leak(self, lease: Lease) -> None:
        if not lease.active:
            return
        self._stats[CONNECTIONS_LEAKED] += 1
        logger.warning(
            "pool %r: connection checked out %.1fs ago and not returned yet; checked out at:\n%s",
            self.name,
            monotonic() - lease.checked_out_at,
            "".join(lease.stack.format()) if lease.stack is not None else "(no stack)",
        )

    # -- maintenance ----------------------------------------------------------

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None and self._maintenance_interval() is not None:
            self._sweeper = gevent.spawn(self._sweep_forever, self._generation)

    def _maintenance_interval(self) -> float | None:
        limits = [x / 2 for x in (self.max_idle, self.max_lifetime) if x is not None]
        if self.keepalive_interval is not None:
            limits.append(self.keepalive_interval / 2)
        if self.min_size:
            limits.append(_MIN_CONNS_CHECK)
        if not limits:
            return None
        return min(max(min(limits), 0.25), 60.0)

    def _sweep_forever(self, spawned_in: int) -> None:
        """Expire idle connections, keep them alive, keep min_size open, while traffic is low.

        ``spawned_in``: the generation when it was spawned. The parent's sweeper,
        inherited through fork(), stops when it resumes (the child starts its own).
        """
        interval = self._maintenance_interval() or 60.0
        while True:
            gevent.sleep(interval)
            if self._closed or spawned_in < self._born:
                return
            self.sweep()
            if self.keepalive_interval is not None or self.min_size:
                self.keep_alive()
                if spawned_in < self._born:
                    return  # forked during a keepalive round trip
            self._grow()

    def sweep(self) -> int:
        """Close expired idle connections now (keeping min_size); return how many."""
        now = monotonic()
        # Critical section: pick the expired ones out of the idle set. Idle ones
        # past MAX_IDLE are kept while the pool has no more than min_size.
        spare = self._total_size() - self.min_size
        expired = []
        for c in self._idle:
            if c.expired(now, self.max_idle if spare > 0 else None):
                expired.append(c)
                spare -= 1
        for conn in expired:
            self._idle.remove(conn)
        for conn in expired:
            self._stats[CONNECTIONS_EXPIRED] += 1
            self._close_quietly(conn)
        if expired:
            self._grow()
        return len(expired)

    def keep_alive(self) -> int:
        """Give a round trip to idle connections due for one; return how many were lost.

        Due: idle for ``keepalive_interval``, or the server sent something (going
        away). Each one is taken out of the idle set with a slot while it is
        checked, as a checkout would, so the cap holds.
        """
        now = monotonic()
        interval = self.keepalive_interval
        due = [
            c
            for c in self._idle
            if (interval is not None and now - c.last_used >= interval) or c.socket_has_input()
        ]
        lost = 0
        for conn in due:
            # Critical section: a checkout may have taken it meanwhile.
            if conn not in self._idle:
                continue
            self._idle.remove(conn)
            self._slots_used += 1
            self._stats[CHECKS_KEEPALIVE] += 1
            try:
                failure = self._round_trip(conn.raw, self.timeout, "keepalive round trip")
            except BaseException:
                # Killed during the round trip: the connection's state is unknown.
                self._close_and_release(conn)
                raise
            if failure is None or conn.generation != self._generation:
                # Alive, or outdated meanwhile (drained, or the parent's after a fork):
                # _give_back_idle keeps, hands over or closes it.
                self._give_back_idle(conn)
                if conn.generation < self._born:
                    break  # forked meanwhile: the rest was the parent's
                continue
            self._lost(conn, failure)
            lost += 1
            self._reconnect_pending = True
            self._close_and_release(conn)
        return lost

    def _cancel_quietly(self, conn: PooledConnection) -> None:
        # A query interrupted on the client (timeout, killed greenlet) still runs
        # in the server, and closing the socket does not stop it: its backend
        # would outlive the slot, a server connection beyond the cap.
        try:
            self.driver.cancel(conn.raw)
        except Exception as exc:
            logger.debug("pool %r: cancelling the running query failed: %s", self.name, exc)

    def _cancel_and_close(self, conn: PooledConnection, pid: int) -> None:
        """Cancel the running query, close, free the slot; ``pid``: the process it was taken in."""
        try:
            self._cancel_quietly(conn)
        finally:
            # A child forked meanwhile forgot this slot (forget_after_fork).
            if self._pid == pid:
                self._close_and_release(conn)

    def _close_quietly(self, conn: PooledConnection) -> None:
        self._open_conns.discard(conn)
        try:
            self._close_raw(conn.raw)
        except Exception as exc:
            logger.debug("pool %r: error closing connection: %s", self.name, exc)

    def _close_raw(self, raw: Any) -> None:
        """Close a driver connection the pool owns; ``on_close`` hears of it whatever happens."""
        try:
            self.driver.close(raw)
        finally:
            if self.on_close is not None:
                self.on_close(raw)

    def close(self) -> None:
        """Close idle connections and refuse new checkouts.

        Connections in use are closed when they are given back; connects in
        progress are stopped. Waiters get `PoolClosed`.
        """
        if self._closed:
            return
        self._closed = True
        idle = list(self._idle)
        self._idle.clear()
        while self._hand_over(
            PoolClosed(f"pool {self.name!r} was closed while waiting for a connection")
        ):
            pass
        for conn in idle:
            self._close_quietly(conn)
        if self._retry_timer is not None:
            self._retry_timer.close()
            self._retry_timer = None
        current = getcurrent()
        connectors = [g for g in self._connectors if g is not current]
        if connectors:
            gevent.killall(connectors, block=False)
        if self._sweeper is not None and self._sweeper is not current:
            self._sweeper.kill(block=False)
        logger.info("pool %r closed (%d idle connections closed)", self.name, len(idle))

    @property
    def closed(self) -> bool:
        return self._closed

    # -- operations -----------------------------------------------------------

    def drain(self) -> int:
        """Close idle connections now, and every connection in use when it is given back.

        Checkouts that follow get fresh connections (new credentials, a new server
        behind the same name). It starts a new generation: a connection of an older
        one (in use, being opened by a connector whose connect started before the
        drain, handed to a queued checkout not yet resumed, in a health-check or
        keepalive round trip) is closed wherever it passes next (`_give_back_idle`,
        `_check`, `_wait`) instead of being kept or handed out; its slot then goes to
        a fresh connect, so a queued checkout gets a new connection instead.
        Returns how many idle connections were closed.
        """
        # Critical section: a new generation, and the idle set emptied.
        self._generation += 1
        idle = list(self._idle)
        self._idle.clear()
        in_use = len(self._in_use)
        for conn in idle:
            self._stats[CONNECTIONS_EXPIRED] += 1
            self._close_quietly(conn)
        logger.info(
            "pool %r drained: %d idle connections closed, %d in use to be closed when returned",
            self.name,
            len(idle),
            in_use,
        )
        # Waiters and MIN_CONNS get connectors for the freed room.
        self._grow()
        return len(idle)

    def resize(self, max_size: int) -> None:
        """Change the cap to ``max_size`` now.

        Growing starts connectors for queued checkouts at once. Shrinking closes
        idle connections beyond the new cap now and closes connections in use as
        they are given back, until the pool is under the new cap (`_give_back_idle`):
        a holder is never interrupted, and no checkout gets a slot meanwhile.
        """
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        old = self.max_size
        # Critical section: new cap, then settle the idle connections against it.
        self.max_size = max_size
        if self.reuse_size >= old or self.reuse_size > max_size:
            # REUSE_CONNS unset (it was the cap) follows the cap; a larger one shrinks with it.
            self.reuse_size = max_size
        self.min_size = min(self._min_size_configured, max_size)
        idle: list[PooledConnection] = []
        while self._total_size() > max_size and self._idle:
            idle.append(self._idle.popleft())
        for conn in idle:
            self._close_quietly(conn)
        excess = max(self._total_size() - max_size, 0)
        logger.info(
            "pool %r resized: max_size %d -> %d (%d idle closed, %d to close when returned)",
            self.name,
            old,
            max_size,
            len(idle),
            excess,
        )
        self._grow()

    def get_stats(self) -> dict[str, int]:
        """Counters since the pool was created, and the live measures, by name."""
        stats = {key: self._stats[key] for key in COUNTER_KEYS}
        stats[POOL_MAX] = self.max_size
        stats[POOL_MIN] = self.min_size
        stats[POOL_SIZE] = self._slots_used + len(self._idle)
        stats[POOL_AVAILABLE] = len(self._idle)
        stats[POOL_OPENING] = self._connecting
        stats[REQUESTS_WAITING] = self._waiting
        for source in self._stats_sources:
            stats.update(source())
        return stats

    def add_stats_source(self, source: Callable[[], dict[str, int]]) -> None:
        """Merge ``source()`` (more measures, by name) into every `get_stats` result."""
        self._stats_sources.append(source)

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without touching them.

        Called by `forking` (the package's one fork hook); the inherited driver
        objects go to `forking.keep_inherited_alive`, which says why they are
        never closed. A new generation starts (``_born``): the parent's greenlets
        that go on in the child (connectors, queued checkouts, round trips, the
        sweeper) see it when they resume, and touch no slot, count or waiter of
        the child. Every connection of the parent is detached now, including those
        out of the idle set and not in use (in a round trip, handed over, being
        reset); only a connect in flight has no known socket yet (its connector
        detaches it when the connect ends, `_open`).
        """
        # All of them, including those out of the idle set and not in use (a round
        # trip, a hand-over, a reset in flight): nothing the child does reaches them.
        inherited = {*self._open_conns, *self._idle, *(lease.conn for lease in self._in_use)}
        for lease in self._in_use:
            lease.conn.lease = None
            lease.unwatch()
        for conn in inherited:
            self._forget_inherited(conn.raw)
        self._open_conns.clear()
        # Greenlets of the parent (connectors, queued checkouts, round trips, the
        # sweeper) go on in the child: a new generation makes them leave this one alone.
        self._generation += 1
        self._born = self._generation
        self._idle.clear()
        self._in_use.clear()
        self._waiters.clear()
        self._waiting = 0
        self._slots_used = 0
        self._sweeper = None
        # The parent's connects and backoff timer do not exist in the child.
        self._connecting = 0
        self._connectors = set()
        self._connect_failures = 0
        self._backoff_rounds = 0
        self._retry_timer = None
        self._capped = False
        self._pid = os.getpid()
        self._thread_id = _native_thread_id()


def _no_target() -> Any:
    return None


def _reclaim_collected(lease_ref: weakref.ref[Lease]) -> None:
    # Called by the garbage collector, in whatever greenlet triggered it: the
    # rollback must not happen here, so it gets a greenlet of its own.
    lease = lease_ref()
    if lease is not None and lease.active:
        gevent.spawn(lease.pool._reclaim, lease, "owner garbage collected")
