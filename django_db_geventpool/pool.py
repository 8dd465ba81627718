"""A gevent-cooperative connection pool with a hard cap and first-come waiting.

Semantics, which the rest of the package relies on:

* **Hard cap.** At most ``max_size`` connections are open at once, counting those
  being opened. A checkout takes a *slot* before it yields for anything (connect,
  health check), so a burst of greenlets can never open more than the cap.
* **Bounded wait.** When every slot is taken, a checkout queues up (first come,
  first served) for at most ``timeout`` seconds, then raises `PoolTimeout`. A waiter
  is woken when a connection is returned *and* when one is discarded (it then gets
  the freed slot and opens a new connection). A waiter that already timed out is
  never handed a connection.
* **Healthy checkouts.** Every checkout runs a local check that costs no round trip
  (driver state; has the server closed the socket or sent anything?). A connection
  idle longer than ``health_check_delay`` also gets a server round trip. A broken
  connection is closed, its slot reused at once, and a replacement is found or
  opened without the caller seeing an error.
* **Clean returns.** A returned connection is rolled back if it is in a transaction,
  put back in autocommit mode and, optionally, reset with ``reset_query``; one in an
  active or unknown state is closed.
* **Nothing lost.** A connection held by a greenlet that ends without returning it
  is returned when the greenlet ends (gevent ``Greenlet``) or when its owner object
  is garbage collected. After ``fork()`` the child forgets every connection of its
  parent without touching the parent's sockets.

The pool knows nothing of Django or of a database driver: the driver-specific
operations come from a `DriverOps` object and connections are opened by a callable
given to `ConnectionPool.checkout`.
"""

from __future__ import annotations

import ctypes
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

from .errors import AllPeersDown, PoolClosed, PoolError, PoolTimeout
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
)
STATS_KEYS = (POOL_MAX, POOL_SIZE, POOL_AVAILABLE, REQUESTS_WAITING, *COUNTER_KEYS)


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


class PooledConnection:
    """A server connection owned by the pool, and what the pool knows of it."""

    __slots__ = ("raw", "target", "created_at", "expires_at", "last_used", "lease", "_poller", "__weakref__")

    def __init__(
        self, raw: Any, fileno: int, now: float, lifetime: float | None, target: Any = None
    ) -> None:
        self.raw = raw
        self.target = target
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


class Lease:
    """One checkout of a `PooledConnection`; give it back with `ConnectionPool.checkin`.

    ``connection`` is the driver's connection object. A lease is valid until it
    is checked in or discarded; giving back a stale lease is a no-op.
    """

    __slots__ = (
        "pool", "conn", "connection", "greenlet", "checked_out_at", "stack", "leak_timer",
        "finalizer", "__weakref__",
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

    def _on_holder_exit(self, greenlet: gevent.Greenlet) -> None:
        # Runs in the hub when the holding greenlet ends: I/O (a rollback) must
        # happen in a greenlet of its own.
        if self.active:
            gevent.spawn(self.pool._reclaim, self, f"greenlet {greenlet!r} ended")


class _Waiter:
    """A checkout queued for a slot; served by `ConnectionPool._hand_over`.

    ``wakeup`` is gevent's low-level hub ``Waiter`` rather than an ``Event``: a
    queued checkout is woken exactly once, from the hub, so it needs no list of
    links, and a waiting checkout costs about a third less CPU (measured with bench/).
    """

    __slots__ = ("wakeup", "served", "cancelled", "conn")

    def __init__(self) -> None:
        self.wakeup = HubWaiter()
        self.served = False
        self.cancelled = False
        self.conn: PooledConnection | object | None = None


# Frames of the checkout stack kept for a leak report (innermost first): the
# ORM alone takes about 15 under the application's code.
_LEAK_STACK_DEPTH = 64

# Handed to waiters when the pool closes under them.
_POOL_CLOSED = object()

# Health verdicts at checkout.
_HEALTHY, _EXPIRED, _LOST = 0, 1, 2


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

        # Slots taken by connections in use or being opened. Idle connections
        # hold no slot; slots + idle never exceeds max_size.
        self._slots_used = 0
        # Idle connections, most recently used last (LIFO reuse keeps few hot).
        self._idle: deque[PooledConnection] = deque()
        # Queued checkouts, oldest first; cancelled ones are skipped lazily.
        self._waiters: deque[_Waiter] = deque()
        self._waiting = 0
        self._in_use: set[Lease] = set()
        self._stats: Counter[str] = Counter()
        self._closed = False
        self._pid = os.getpid()
        self._thread_id = _native_thread_id()
        self._sweeper: gevent.Greenlet | None = None
        # Extra live measures merged into get_stats() (per-peer state, see peers.py).
        self._stats_sources: list[Callable[[], dict[str, int]]] = []
        # Wait, use and connect times (histogram.py); their p50/p99 join get_stats().
        self.timings = PoolTimings()
        self._stats_sources.append(self.timings.stats)
        # Slots to drop instead of reuse as connections come back, after resize() shrank the cap.
        self._excess = 0
        _live_pools.add(self)
        logger.info(
            "pool %r created: max_size=%d reuse_size=%d timeout=%.1fs",
            name, max_size, self.reuse_size, timeout,
        )

    # -- checkout -----------------------------------------------------------

    def checkout(
        self,
        open_connection: Callable[[bool], Any],
        timeout: float | None = None,
        owner: object | None = None,
        target: Any = None,
    ) -> Lease:
        """Return a `Lease` on a healthy connection, or raise within ``timeout``.

        ``open_connection(reconnect)`` opens a new driver connection; ``reconnect``
        is true when it replaces a broken one or retries a failed connect.
        ``owner``, if given, is an object whose garbage collection gives the
        connection back (used when the holder is not a gevent ``Greenlet``).
        ``target`` tells what the connection must be connected to (server,
        database, user): an idle connection opened for another target is closed.
        Raises `PoolTimeout` after ``timeout`` seconds (default: the pool's),
        `PoolClosed` if the pool is closed, or the driver's connect error after
        the retries.
        """
        if self._thread_id != _native_thread_id():
            raise PoolError(
                f"pool {self.name!r} was created in another OS thread; a pool serves the "
                "greenlets of one thread. Run gevent.monkey.patch_all() first so that "
                "threads are greenlets, or serve this thread with Django's own backend."
            )
        started = monotonic()
        stats = self._stats
        stats[REQUESTS_NUM] += 1
        # Critical section: take a free slot now, unless earlier checkouts are
        # queued (first come, first served); no yield between the test and the take.
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        if self._slots_used < self.max_size and not self._waiting:
            self._slots_used += 1
            conn = self._idle.pop() if self._idle else None
        else:
            conn = self._wait_for_slot(self.timeout if timeout is None else timeout, started)
        # This checkout owns a slot from here on: any failure must free it.
        try:
            conn = self._make_ready(conn, open_connection, target)
        except BaseException:
            stats[REQUESTS_ERRORS] += 1
            self._release_slot()
            raise
        lease = self._lend(conn, owner)
        self.timings.wait_time.record(lease.checked_out_at - started)
        return lease

    def _wait_for_slot(self, timeout: float, started: float) -> PooledConnection | None:
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._waiting += 1
        self._stats[REQUESTS_QUEUED] += 1
        # Woken by _hand_over or by this timer, whichever comes first; `served`
        # (set in _hand_over's critical section) is what decides, not the wake-up.
        timer = waiter.wakeup.hub.loop.timer(timeout)
        timer.start(waiter.wakeup.switch, None)
        try:
            waiter.wakeup.get()
        except BaseException:
            # Killed or interrupted while queued: never lose what was handed over.
            self._abandon(waiter)
            raise
        finally:
            timer.close()
        waited_ms = int((monotonic() - started) * 1000)
        self._stats[REQUESTS_WAIT_MS] += waited_ms
        if not waiter.served:
            # Critical section: nobody served us in time, and now nobody will.
            waiter.cancelled = True
            self._waiting -= 1
            self._stats[REQUESTS_ERRORS] += 1
            self._stats[REQUESTS_TIMEOUTS] += 1
            logger.warning(
                "pool %r: checkout timed out after %.1fs (MAX_CONNS=%d, %d in use, %d waiting)",
                self.name, waited_ms / 1000, self.max_size, self._slots_used, self._waiting,
            )
            raise PoolTimeout(
                f"pool {self.name!r}: no connection available after {waited_ms / 1000:.2f}s "
                f"(MAX_CONNS={self.max_size}, {self._slots_used} in use, "
                f"{self._waiting} other checkouts waiting); raise MAX_CONNS or POOL_TIMEOUT, "
                "or give connections back sooner"
            )
        if waiter.conn is _POOL_CLOSED:
            raise PoolClosed(f"pool {self.name!r} was closed while waiting for a connection")
        return waiter.conn  # type: ignore[return-value]

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.served:
            conn = waiter.conn
            if conn is _POOL_CLOSED:
                return
            # We own the slot (and maybe a connection): pass it on untouched.
            if conn is None:
                self._release_slot()
            else:
                self._give_back_idle(conn)  # type: ignore[arg-type]
        else:
            waiter.cancelled = True
            self._waiting -= 1

    def _make_ready(
        self, conn: PooledConnection | None, open_connection: Callable[[bool], Any], target: Any
    ) -> PooledConnection:
        """Turn an idle connection (or none) into a healthy one; the slot is ours."""
        reconnect = False
        while conn is not None:
            try:
                verdict = self._check(conn) if conn.target == target else _EXPIRED
            except BaseException:
                # Killed during the round trip: the connection's state is unknown.
                self._close_quietly(conn)
                raise
            if verdict == _HEALTHY:
                return conn
            if verdict == _LOST:
                reconnect = True
            self._close_quietly(conn)
            # Critical section: another idle connection may serve instead.
            conn = self._idle.pop() if self._idle else None
        return self._open(open_connection, reconnect, target)

    def _check(self, conn: PooledConnection) -> int:
        now = monotonic()
        if (conn.expires_at is not None and now >= conn.expires_at) or (
            self.max_idle is not None and now - conn.last_used >= self.max_idle
        ):
            self._stats[CONNECTIONS_EXPIRED] += 1
            logger.debug("pool %r: closing expired connection %r", self.name, conn.raw)
            return _EXPIRED
        raw = conn.raw
        if self.driver.is_closed(raw):
            return self._lost(conn, "closed by the driver")
        delay = self.health_check_delay
        if conn.socket_has_input() or (delay is not None and now - conn.last_used >= delay):
            self._stats[CHECKS_ROUNDTRIP] += 1
            try:
                self.driver.ping(raw)
            except Exception as exc:
                return self._lost(conn, f"round trip failed: {exc}".strip())
        return _HEALTHY

    def _lost(self, conn: PooledConnection, why: str) -> int:
        self._stats[CONNECTIONS_LOST] += 1
        logger.warning("pool %r: discarding broken connection (%s)", self.name, why)
        return _LOST

    def _open(
        self, open_connection: Callable[[bool], Any], reconnect: bool, target: Any
    ) -> PooledConnection:
        stats = self._stats
        delay = self.connect_retry_delay
        attempt = 0
        while True:
            stats[CONNECTIONS_NUM] += 1
            started = monotonic()
            try:
                raw = open_connection(reconnect or attempt > 0)
            except self.driver.connect_errors as exc:
                stats[CONNECTIONS_ERRORS] += 1
                if attempt >= self.connect_retries or self._closed:
                    raise
                attempt += 1
                pause = delay * random.uniform(0.5, 1.0)
                logger.warning(
                    "pool %r: connect failed (%s); retry %d of %d in %.2fs",
                    self.name, str(exc).strip(), attempt, self.connect_retries, pause,
                )
                gevent.sleep(pause)
                delay *= 2
                continue
            except BaseException as exc:
                if isinstance(exc, AllPeersDown) and not exc.attempted:
                    # Refused before any server was tried (every peer down): no attempt.
                    stats[CONNECTIONS_NUM] -= 1
                else:
                    stats[CONNECTIONS_ERRORS] += 1
                raise
            now = monotonic()
            stats[CONNECTIONS_MS] += int((now - started) * 1000)
            self.timings.create_time.record(now - started)
            try:
                conn = PooledConnection(
                    raw, self.driver.fileno(raw), now, self.max_lifetime, target
                )
            except BaseException:
                self.driver.close(raw)
                raise
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
        clean = False
        try:
            clean = self._reset(conn)
        finally:
            # Not clean, or killed during the rollback or reset (it yields): its
            # state is unknown either way.
            if not clean:
                self._stats[RETURNS_BAD] += 1
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
        if lease.greenlet is not None:
            lease.greenlet.unlink(lease._on_holder_exit)
            lease.greenlet = None
        if lease.finalizer is not None:
            lease.finalizer.detach()
        if lease.leak_timer is not None:
            lease.leak_timer.close()
        logger.debug("pool %r: returned %r", self.name, conn.raw)
        return conn

    def _reset(self, conn: PooledConnection) -> bool:
        """Leave the connection idle and in autocommit; False if it must be closed."""
        driver, raw = self.driver, conn.raw
        if driver.is_closed(raw):
            return False
        status = driver.transaction_status(raw)
        if status != TransactionStatus.IDLE:
            name = TransactionStatus.NAMES[status]
            if status not in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                logger.warning("pool %r: closing connection returned in %s state", self.name, name)
                if status == TransactionStatus.ACTIVE:
                    self._cancel_quietly(conn)
                return False
            logger.warning("pool %r: connection returned in %s state; rolling back", self.name, name)
            try:
                driver.rollback(raw)
            except Exception as exc:
                logger.warning("pool %r: rollback failed, closing the connection: %s", self.name, exc)
                return False
        try:
            driver.restore_autocommit(raw)
            if self.reset_query:
                driver.execute(raw, self.reset_query)
        except Exception as exc:
            logger.warning("pool %r: reset failed, closing the connection: %s", self.name, exc)
            return False
        return True

    def _give_back_idle(self, conn: PooledConnection) -> None:
        now = monotonic()
        conn.last_used = now
        # Critical section: hand the connection to the oldest waiter, else keep
        # it idle (up to reuse_size, and only if it has not outlived its lifetime).
        if self._excess:
            # resize() shrank the cap: this slot goes away with its connection.
            self._close_and_release(conn)
            return
        if not self._closed and (conn.expires_at is None or now < conn.expires_at):
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
        """Close a connection that holds a slot, and free the slot."""
        self._close_quietly(conn)
        self._release_slot()

    def _release_slot(self) -> None:
        """Free one slot (its connection already closed): a waiter gets it first."""
        if self._excess:
            # resize() shrank the cap: this slot goes away.
            self._excess -= 1
        elif self._hand_over(None):
            return
        if self._slots_used <= 0:
            raise AssertionError(f"pool {self.name!r}: slot released more often than taken")
        self._slots_used -= 1

    def _hand_over(self, conn: PooledConnection | object | None) -> bool:
        # Critical section: serve the oldest waiter that has not given up.
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.cancelled:
                continue
            waiter.served = True
            waiter.conn = conn
            self._waiting -= 1
            # Wake it from the hub, never switching away inside this section.
            wakeup = waiter.wakeup
            wakeup.hub.loop.run_callback(wakeup.switch, None)
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
            self.name, why,
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
        if self._sweeper is None and (self.max_idle is not None or self.max_lifetime is not None):
            self._sweeper = gevent.spawn(self._sweep_forever)

    def _sweep_forever(self) -> None:
        """Close idle connections past MAX_IDLE or MAX_LIFETIME while traffic is low."""
        limits = [x for x in (self.max_idle, self.max_lifetime) if x is not None]
        interval = min(max(min(limits) / 2, 0.5), 60.0)
        pid = self._pid
        while not self._closed and os.getpid() == pid:
            gevent.sleep(interval)
            self.sweep()

    def sweep(self) -> int:
        """Close expired idle connections now; return how many were closed."""
        now = monotonic()
        # Critical section: pick the expired ones out of the idle set.
        expired = [
            c for c in self._idle
            if (c.expires_at is not None and now >= c.expires_at)
            or (self.max_idle is not None and now - c.last_used >= self.max_idle)
        ]
        for conn in expired:
            self._idle.remove(conn)
        for conn in expired:
            self._stats[CONNECTIONS_EXPIRED] += 1
            self._close_quietly(conn)
        return len(expired)

    def _cancel_quietly(self, conn: PooledConnection) -> None:
        # A query interrupted on the client (timeout, killed greenlet) still runs
        # in the server, and closing the socket does not stop it: its backend
        # would outlive the slot, a server connection beyond the cap.
        try:
            self.driver.cancel(conn.raw)
        except Exception as exc:
            logger.debug("pool %r: cancelling the running query failed: %s", self.name, exc)

    def _close_quietly(self, conn: PooledConnection) -> None:
        try:
            self.driver.close(conn.raw)
        except Exception as exc:
            logger.debug("pool %r: error closing connection: %s", self.name, exc)

    def close(self) -> None:
        """Close idle connections and refuse new checkouts.

        Connections in use are closed when they are given back. Waiters get
        `PoolClosed`.
        """
        if self._closed:
            return
        self._closed = True
        idle = list(self._idle)
        self._idle.clear()
        while self._hand_over(_POOL_CLOSED):
            pass
        for conn in idle:
            self._close_quietly(conn)
        if self._sweeper is not None and self._sweeper is not getcurrent():
            self._sweeper.kill(block=False)
        logger.info("pool %r closed (%d idle connections closed)", self.name, len(idle))

    @property
    def closed(self) -> bool:
        return self._closed

    # -- operations -----------------------------------------------------------

    def drain(self) -> int:
        """Close idle connections now, and every connection in use when it is given back.

        Checkouts that follow open fresh connections (new credentials, a new server
        behind the same name). A connection being opened or handed to a queued
        checkout at this moment is kept.
        Returns how many idle connections were closed.
        """
        now = monotonic()
        # Critical section: empty the idle set; mark connections in use as expired,
        # so that checkin closes them instead of keeping or handing them over.
        idle = list(self._idle)
        self._idle.clear()
        for lease in self._in_use:
            lease.conn.expires_at = now
        in_use = len(self._in_use)
        for conn in idle:
            self._stats[CONNECTIONS_EXPIRED] += 1
            self._close_quietly(conn)
        logger.info(
            "pool %r drained: %d idle connections closed, %d in use to be closed when returned",
            self.name, len(idle), in_use,
        )
        return len(idle)

    def resize(self, max_size: int) -> None:
        """Change the cap to ``max_size`` now.

        Growing serves queued checkouts at once with the new slots. Shrinking closes
        idle connections beyond the new cap now and drops connections in use as they
        are given back, until the pool is under the new cap: a holder is never
        interrupted, and no checkout gets a slot meanwhile.
        """
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        old = self.max_size
        # Critical section: new cap, then settle the slots against it.
        self.max_size = max_size
        if self.reuse_size >= old or self.reuse_size > max_size:
            # REUSE_CONNS unset (it was the cap) follows the cap; a larger one shrinks with it.
            self.reuse_size = max_size
        excess = self._slots_used + len(self._idle) - max_size
        idle: list[PooledConnection] = []
        while excess > 0 and self._idle:
            idle.append(self._idle.popleft())
            excess -= 1
        self._excess = max(excess, 0)
        while self._waiting and self._slots_used + len(self._idle) < max_size:
            if not self._hand_over(None):
                break
            self._slots_used += 1
        for conn in idle:
            self._close_quietly(conn)
        logger.info(
            "pool %r resized: max_size %d -> %d (%d idle closed, %d to drop when returned)",
            self.name, old, max_size, len(idle), self._excess,
        )

    def get_stats(self) -> dict[str, int]:
        """Counters since the pool was created, and the live measures, by name."""
        stats = {key: self._stats[key] for key in COUNTER_KEYS}
        stats[POOL_MAX] = self.max_size
        stats[POOL_SIZE] = self._slots_used + len(self._idle)
        stats[POOL_AVAILABLE] = len(self._idle)
        stats[REQUESTS_WAITING] = self._waiting
        for source in self._stats_sources:
            stats.update(source())
        return stats

    def add_stats_source(self, source: Callable[[], dict[str, int]]) -> None:
        """Merge ``source()`` (more measures, by name) into every `get_stats` result."""
        self._stats_sources.append(source)

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without touching them.

        The sockets are shared with the parent, so the child must neither send on
        them nor close them politely (a Terminate message would end the parent's
        session). Each descriptor is pointed at /dev/null, and the driver objects
        are kept alive, never closed: closing one (or letting it be freed) takes
        the driver's connection lock, which a greenlet of the parent may have held
        at fork time, and the child would hang before it could ``exec`` (psycopg2,
        any ``subprocess`` call made while queries run).
        """
        inherited = [*self._idle, *(lease.conn for lease in self._in_use)]
        for lease in self._in_use:
            lease.conn.lease = None
            lease.greenlet = None
            if lease.finalizer is not None:
                lease.finalizer.detach()
        if inherited:
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                for conn in inherited:
                    try:
                        os.dup2(devnull, self.driver.fileno(conn.raw))
                    except Exception:
                        pass
                    _inherited_after_fork.append(conn.raw)
                    # One reference that is never dropped, so not even the
                    # interpreter's shutdown frees (and thereby closes) it.
                    ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn.raw))
            finally:
                os.close(devnull)
        self._idle.clear()
        self._in_use.clear()
        self._waiters.clear()
        self._waiting = 0
        self._slots_used = 0
        self._excess = 0
        self._sweeper = None
        self._pid = os.getpid()
        self._thread_id = _native_thread_id()


def _reclaim_collected(lease_ref: weakref.ref[Lease]) -> None:
    # Called by the garbage collector, in whatever greenlet triggered it: the
    # rollback must not happen here, so it gets a greenlet of its own.
    lease = lease_ref()
    if lease is not None and lease.active:
        gevent.spawn(lease.pool._reclaim, lease, "owner garbage collected")


# Driver connections a forked child inherited, their sockets now /dev/null: kept
# referenced for the child's lifetime so that they are never closed or freed
# (see ConnectionPool._forget_after_fork): a few objects and /dev/null descriptors.
_inherited_after_fork: list[Any] = []

# Every pool of the process, so a fork can make the child forget them all.
_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_live_pools):
        pool._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
