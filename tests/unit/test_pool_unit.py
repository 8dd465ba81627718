"""The pool's own logic, with a fake driver and no server.

A fake connection owns one end of a socket pair: closing the other end is what a
server going away looks like to the pool's local health check.
"""

from __future__ import annotations

import os
import socket
from time import monotonic

import gevent
import gevent.event
import pytest

from django_db_geventpool.errors import PoolClosed, PoolTimeout
from django_db_geventpool.pool import ConnectionPool, TransactionStatus
from tests.support.eventually import wait_until


class FakeConnectError(Exception):
    """What the fake driver raises when a connect fails."""


class FakeConnection:
    def __init__(self, number: int) -> None:
        self.number = number
        self.client, self.server = socket.socketpair()
        self.closed = False
        self.status = TransactionStatus.IDLE
        self.autocommit = True
        self.pings = 0
        self.rollbacks = 0
        self.executed: list[str] = []
        self.fail_rollback = False
        self.rollback_delay = 0.0
        self.cancel_delay = 0.0
        self.cancelled = False
        #: When set, a round trip waits for it (a ping in flight, held open by the test).
        self.ping_gate: gevent.event.Event | None = None

    def server_goes_away(self) -> None:
        self.server.close()

    def close(self) -> None:
        self.closed = True
        self.client.close()


class FakeDriver:
    connect_errors = (FakeConnectError,)

    def is_closed(self, raw: FakeConnection) -> bool:
        return raw.closed

    def fileno(self, raw: FakeConnection) -> int:
        return raw.client.fileno()

    def transaction_status(self, raw: FakeConnection) -> int:
        return raw.status

    def ping(self, raw: FakeConnection) -> None:
        raw.pings += 1
        if raw.ping_gate is not None:
            assert raw.ping_gate.wait(30), "the test never released the round trip"
        if raw.server.fileno() == -1:
            raise FakeConnectError("server closed the connection unexpectedly")

    def rollback(self, raw: FakeConnection) -> None:
        if raw.rollback_delay:
            gevent.sleep(raw.rollback_delay)
        if raw.fail_rollback:
            raise FakeConnectError("rollback failed")
        raw.rollbacks += 1
        raw.status = TransactionStatus.IDLE

    def restore_autocommit(self, raw: FakeConnection) -> None:
        raw.autocommit = True

    def execute(self, raw: FakeConnection, sql: str) -> None:
        raw.executed.append(sql)

    def close(self, raw: FakeConnection) -> None:
        raw.close()

    def cancel(self, raw: FakeConnection) -> None:
        if raw.cancel_delay:
            gevent.sleep(raw.cancel_delay)
        raw.cancelled = True


class Server:
    """Opens fake connections; optionally slow (yields) or failing."""

    def __init__(self, connect_delay: float = 0.0) -> None:
        self.opened: list[FakeConnection] = []
        self.connect_delay = connect_delay
        self.failures_left = 0
        self.reconnect_flags: list[bool] = []
        #: When set, connects wait for it (a connect in flight, held open by the test).
        self.connect_gate: gevent.event.Event | None = None
        self.connects_started = 0

    def open(self, reconnect: bool) -> FakeConnection:
        self.reconnect_flags.append(reconnect)
        self.connects_started += 1
        if self.connect_gate is not None:
            assert self.connect_gate.wait(30), "the test never released the connect"
        if self.connect_delay:
            gevent.sleep(self.connect_delay)
        if self.failures_left:
            self.failures_left -= 1
            raise FakeConnectError("connection refused")
        conn = FakeConnection(len(self.opened))
        self.opened.append(conn)
        return conn

    @property
    def open_now(self) -> int:
        return sum(not c.closed for c in self.opened)


def _sleep_at_least(seconds: float) -> None:
    """Sleep ``seconds`` by the clock the pool reads (monotonic), never less.

    A gevent timer counts from the loop's cached time, which lags behind when the
    process ran a while without an iteration of the loop (a loaded machine): a
    plain sleep can end early by that lag.
    """
    deadline = monotonic() + seconds
    while (left := deadline - monotonic()) > 0:
        gevent.sleep(left)


def make_pool(**kwargs) -> ConnectionPool:
    kwargs.setdefault("max_size", 2)
    kwargs.setdefault("timeout", 5.0)
    return ConnectionPool("unit", FakeDriver(), **kwargs)


@pytest.fixture
def server() -> Server:
    return Server()


def test_cap_holds_when_connects_yield():
    server = Server(connect_delay=0.01)
    pool = make_pool(max_size=4)
    peak = []

    def request():
        lease = pool.checkout(server.open)
        peak.append(server.open_now)
        gevent.sleep(0.001)
        pool.checkin(lease)

    gevent.joinall([gevent.spawn(request) for _ in range(50)], raise_error=True)
    assert max(peak) <= 4
    assert len(server.opened) == 4
    assert pool.get_stats()["pool_size"] == 4


def test_waiters_are_served_first_come_first_served(server):
    pool = make_pool(max_size=1)
    holder = pool.checkout(server.open)
    served = []

    def wait_in_line(number):
        lease = pool.checkout(server.open)
        served.append(number)
        pool.checkin(lease)

    waiters = []
    for number in range(5):
        waiters.append(gevent.spawn(wait_in_line, number))
        gevent.sleep(0)  # queue up in spawn order
    assert pool.get_stats()["requests_waiting"] == 5
    pool.checkin(holder)
    gevent.joinall(waiters, raise_error=True)
    assert served == [0, 1, 2, 3, 4]
    assert len(server.opened) == 1


def test_a_newcomer_does_not_overtake_queued_waiters(server):
    pool = make_pool(max_size=1)
    holder = pool.checkout(server.open)
    served = []

    def take(name):
        lease = pool.checkout(server.open)
        served.append(name)
        pool.checkin(lease)

    first = gevent.spawn(take, "queued")
    gevent.sleep(0)
    pool.checkin(holder)
    # The slot is now promised to the queued waiter, which has not run yet.
    late = gevent.spawn(take, "newcomer")
    gevent.joinall([first, late], raise_error=True)
    assert served == ["queued", "newcomer"]


def test_discard_hands_the_slot_to_a_waiter(server):
    pool = make_pool(max_size=1)
    holder = pool.checkout(server.open)
    waiter = gevent.spawn(pool.checkout, server.open)
    gevent.sleep(0)
    pool.discard(holder)
    lease = waiter.get(timeout=30)
    assert lease.connection is not holder.connection
    assert holder.connection.closed
    assert len(server.opened) == 2
    pool.checkin(lease)
    assert pool.get_stats()["pool_size"] == 1


def test_a_checkout_served_a_broken_connection_counts_once_as_queued(server):
    """It waits again for a new connection: one queued checkout, its waits added once."""
    pool = make_pool(max_size=1)
    # Measured from before the holder's checkout: it waited too (for the connect).
    started = monotonic()
    holder = pool.checkout(server.open)  # no idle connection: it waited for a connect
    waiter = gevent.spawn(pool.checkout, server.open)
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 1)
    holder.connection.server_goes_away()
    pool.checkin(holder)  # handed to the waiter, which finds it broken and waits again
    lease = waiter.get(timeout=30)
    waited_ms = (monotonic() - started) * 1000
    assert lease.connection is not holder.connection
    stats = pool.get_stats()
    assert stats["connections_lost"] == 1
    assert stats["requests_num"] == 2
    assert stats["requests_queued"] == 2
    assert stats["requests_wait_ms"] <= waited_ms + 1 + stats["connections_ms"]
    pool.checkin(lease)


def test_timed_out_waiter_is_never_served(server):
    pool = make_pool(max_size=1)
    holder = pool.checkout(server.open)
    with pytest.raises(PoolTimeout) as excinfo:
        pool.checkout(server.open, timeout=0.05)
    assert "MAX_CONNS=1" in str(excinfo.value)
    pool.checkin(holder)
    stats = pool.get_stats()
    assert stats["requests_waiting"] == 0
    assert stats["pool_available"] == 1  # kept idle, not handed to the dead waiter
    assert stats["requests_errors"] == 1
    assert pool.checkout(server.open, timeout=0.05).connection is holder.connection


def test_killed_waiter_gives_up_its_place(server):
    pool = make_pool(max_size=1)
    holder = pool.checkout(server.open)
    waiter = gevent.spawn(pool.checkout, server.open)
    gevent.sleep(0)
    waiter.kill()
    pool.checkin(holder)
    stats = pool.get_stats()
    assert stats["requests_waiting"] == 0
    assert stats["pool_available"] == 1


def test_waiter_killed_after_being_served_passes_the_connection_on(server):
    pool = make_pool(max_size=1)
    holder = pool.checkout(server.open)
    waiter = gevent.spawn(pool.checkout, server.open)
    gevent.sleep(0)
    pool.checkin(holder)  # served, but the waiter has not run yet
    waiter.kill()
    # Whether the kill lands before or after the waiter resumed, the
    # connection comes back (handed on, or reclaimed when the greenlet ends).
    wait_until(lambda: pool.get_stats()["pool_available"] == 1)
    assert pool.checkout(server.open, timeout=0.05).connection is holder.connection


def test_over_release_raises():
    pool = make_pool()
    with pytest.raises(AssertionError, match="released more often than taken"):
        pool._release_slot()


def test_reuse_size_closes_the_surplus(server):
    pool = make_pool(max_size=3, reuse_size=1)
    leases = [pool.checkout(server.open) for _ in range(3)]
    for lease in leases:
        pool.checkin(lease)
    stats = pool.get_stats()
    assert stats["pool_available"] == 1
    assert stats["pool_size"] == 1
    assert server.open_now == 1


def test_connection_past_its_lifetime_is_replaced(server):
    pool = make_pool(max_lifetime=0.05, max_idle=None)
    first = pool.checkout(server.open)
    pool.checkin(first)
    _sleep_at_least(0.08)
    second = pool.checkout(server.open)
    assert second.connection is not first.connection
    assert first.connection.closed
    assert pool.get_stats()["connections_expired"] >= 1


def test_connection_returned_after_its_lifetime_is_closed(server):
    pool = make_pool(max_lifetime=0.05, max_idle=None)
    lease = pool.checkout(server.open)
    _sleep_at_least(0.08)
    pool.checkin(lease)
    assert lease.connection.closed
    assert pool.get_stats()["pool_size"] == 0


def test_idle_connection_past_max_idle_is_swept(server):
    pool = make_pool(max_idle=0.05, max_lifetime=None)
    lease = pool.checkout(server.open)
    pool.checkin(lease)
    _sleep_at_least(0.08)
    assert pool.sweep() == 1
    assert lease.connection.closed
    assert pool.get_stats()["pool_size"] == 0


def test_stale_lease_is_a_no_op(server):
    pool = make_pool(max_size=1)
    lease = pool.checkout(server.open)
    pool.checkin(lease)
    again = pool.checkout(server.open)
    assert again.connection is lease.connection
    pool.checkin(lease)  # stale: must not give back the new holder's connection
    pool.discard(lease)
    assert not lease.active
    assert again.active
    assert not again.connection.closed
    assert pool.get_stats()["pool_available"] == 0
    pool.checkin(again)
    assert pool.get_stats()["pool_available"] == 1


def test_close_wakes_waiters_with_pool_closed(server):
    pool = make_pool(max_size=1)
    holder = pool.checkout(server.open)
    waiters = [gevent.spawn(pool.checkout, server.open) for _ in range(3)]
    gevent.sleep(0)
    pool.close()
    gevent.joinall(waiters)
    assert all(isinstance(w.exception, PoolClosed) for w in waiters)
    with pytest.raises(PoolClosed):
        pool.checkout(server.open)
    pool.checkin(holder)
    assert holder.connection.closed


def test_server_gone_while_idle_is_replaced_without_error(server):
    pool = make_pool(health_check_delay=None)
    lease = pool.checkout(server.open)
    pool.checkin(lease)
    lease.connection.server_goes_away()
    fresh = pool.checkout(server.open)
    assert fresh.connection is not lease.connection
    assert lease.connection.closed
    assert server.reconnect_flags[-1] is True
    stats = pool.get_stats()
    assert stats["connections_lost"] == 1
    assert stats["requests_errors"] == 0


def test_health_check_round_trip_only_after_the_delay(server):
    # A delay that the checkout right after a return cannot reach, even on a busy machine.
    pool = make_pool(health_check_delay=0.5)
    lease = pool.checkout(server.open)
    pool.checkin(lease)
    pool.checkin(pool.checkout(server.open))
    assert lease.connection.pings == 0
    _sleep_at_least(0.6)
    pool.checkin(pool.checkout(server.open))
    assert lease.connection.pings == 1
    assert pool.get_stats()["checks_roundtrip"] == 1


@pytest.mark.parametrize(
    "status, reused",
    [
        (TransactionStatus.INTRANS, True),
        (TransactionStatus.INERROR, True),
        (TransactionStatus.ACTIVE, False),
        (TransactionStatus.UNKNOWN, False),
    ],
)
def test_dirty_return_is_rolled_back_or_closed(server, status, reused):
    pool = make_pool(reset_query="DISCARD ALL")
    lease = pool.checkout(server.open)
    raw = lease.connection
    raw.status = status
    raw.autocommit = False
    pool.checkin(lease)
    # A running query (ACTIVE) is cancelled and closed by a greenlet of its own.
    wait_until(lambda: pool.get_stats()["pool_size"] == (1 if reused else 0))
    assert raw.closed is not reused
    if reused:
        assert raw.rollbacks == 1
        assert raw.autocommit is True
        assert raw.status == TransactionStatus.IDLE
        assert raw.executed == ["DISCARD ALL"]
    else:
        assert pool.get_stats()["returns_bad"] == 1
    # A query still running in the server is cancelled before the close.
    assert raw.cancelled is (status == TransactionStatus.ACTIVE)
    assert pool.get_stats()["pool_size"] == (1 if reused else 0)


def test_failed_rollback_closes_the_connection(server):
    pool = make_pool()
    lease = pool.checkout(server.open)
    lease.connection.status = TransactionStatus.INERROR
    lease.connection.fail_rollback = True
    pool.checkin(lease)
    assert lease.connection.closed
    assert pool.get_stats()["pool_size"] == 0


def test_connect_is_retried_then_failures_degrade_to_waiting(server):
    pool = make_pool(max_size=1, connect_retries=1, connect_retry_delay=0.01)
    server.failures_left = 1
    lease = pool.checkout(server.open)
    assert server.reconnect_flags == [False, True]
    pool.discard(lease)
    server.failures_left = 10**6
    with pytest.raises(PoolTimeout, match="connection refused") as excinfo:
        pool.checkout(server.open, timeout=0.3)
    # The checkout waited its whole timeout, and says why nothing came.
    assert isinstance(excinfo.value.__cause__, FakeConnectError)
    assert "connects to the server are failing" in str(excinfo.value)
    # A probe the backoff timer started just before the timeout may still hold its
    # slot: it fails, and nothing is left queued to start another.
    wait_until(lambda: pool.get_stats()["pool_size"] == 0)
    assert pool.get_stats()["requests_waiting"] == 0
    server.failures_left = 0
    assert pool.checkout(server.open, timeout=2).active


def test_failed_connects_back_off_pool_wide_not_per_waiter(server):
    pool = make_pool(max_size=10, connect_retries=0, connect_retry_delay=0.05, timeout=1.0)
    server.failures_left = 10**6
    waiters = [gevent.spawn(pool.checkout, server.open) for _ in range(50)]
    gevent.joinall(waiters)
    assert all(isinstance(w.exception, PoolTimeout) for w in waiters)
    attempts = pool.get_stats()["connections_num"]
    # 1 s of backoff from 0.05 s, doubling (with jitter), one probe at a time:
    # at most ~10 connect attempts in all for 50 waiters (the first burst
    # starts up to MAX_CONNS at once). Per-waiter retries would make 50+.
    assert attempts <= 10 + 8, attempts
    assert pool.get_stats()["pool_size"] == 0


def test_backoff_never_outlasts_half_a_checkout_so_every_waiting_checkout_sees_a_probe(
    server, caplog
):
    """Doubling from 0.2 s would reach 2 s; capped at POOL_TIMEOUT / 2 = 0.5 s instead.

    So a checkout that waits its whole timeout always sees a connect attempt start in
    its first half: a server that came back is found before the checkout gives up.
    """
    pool = make_pool(max_size=1, connect_retries=0, connect_retry_delay=0.2, timeout=1.0)
    server.failures_left = 10**6
    attempts_per_checkout = []
    for _ in range(6):
        before = pool.get_stats()["connections_num"]
        with pytest.raises(PoolTimeout):
            pool.checkout(server.open)
        attempts_per_checkout.append(pool.get_stats()["connections_num"] - before)
    assert all(attempts >= 1 for attempts in attempts_per_checkout), attempts_per_checkout
    pauses = [
        float(record.args[2])
        for record in caplog.records
        if record.getMessage().startswith("pool 'unit': connect failed")
    ]
    # The doubling did happen (0.2, 0.4, then the ceiling), and never past the ceiling.
    assert len(pauses) >= 4, pauses
    assert max(pauses) <= 0.5, pauses
    assert max(pauses) > 0.2, pauses
    # And a server that is back is found by the next checkout.
    server.failures_left = 0
    assert pool.checkout(server.open).active


def test_waiters_are_served_in_arrival_order_once_failing_connects_recover(server):
    pool = make_pool(max_size=2, connect_retries=0, connect_retry_delay=0.01, timeout=5.0)
    server.failures_left = 5
    served = []

    def request(number):
        lease = pool.checkout(server.open)
        served.append(number)
        gevent.sleep(0.001)
        pool.checkin(lease)

    waiters = []
    for number in range(8):
        waiters.append(gevent.spawn(request, number))
        gevent.sleep(0)  # queue up in spawn order
    gevent.joinall(waiters, raise_error=True)
    assert served == list(range(8))
    assert server.open_now <= 2
    assert pool.get_stats()["connections_errors"] == 5


def test_a_connect_that_never_ends_is_bounded_and_frees_its_slot():
    hanging = Server(connect_delay=3600)
    pool = make_pool(max_size=2, timeout=0.2, connect_timeout=0.4)
    with pytest.raises(PoolTimeout, match=r"took more than|no connection available"):
        pool.checkout(hanging.open)
    # The connector outlived the checkout, bounded by its own deadline.
    wait_until(lambda: pool.get_stats()["pool_size"] == 0)
    assert pool.get_stats()["connections_errors"] >= 1


def test_a_late_connect_serves_the_next_waiter():
    slow = Server(connect_delay=0.3)
    pool = make_pool(max_size=1, timeout=5.0)
    with pytest.raises(PoolTimeout):
        pool.checkout(slow.open, timeout=0.1)
    # The connect goes on without its checkout, and the next checkout gets it.
    lease = pool.checkout(slow.open, timeout=2)
    assert len(slow.opened) == 1
    assert lease.connection is slow.opened[0]


class LimitedServer(Server):
    """Refuses connects beyond ``limit`` open connections (a role's CONNECTION LIMIT)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def open(self, reconnect: bool) -> FakeConnection:
        if self.open_now >= self.limit:
            self.reconnect_flags.append(reconnect)
            raise FakeConnectError("too many connections for role")
        return super().open(reconnect)


def test_the_pool_serves_with_what_the_server_grants(caplog):
    limited = LimitedServer(limit=2)
    pool = make_pool(max_size=6, timeout=5.0, connect_retries=0, connect_retry_delay=0.01)
    served = []

    def request(number):
        lease = pool.checkout(limited.open)
        gevent.sleep(0.002)
        served.append(number)
        pool.checkin(lease)

    gevent.joinall([gevent.spawn(request, n) for n in range(60)], raise_error=True)
    assert len(served) == 60
    assert limited.open_now <= 2
    stats = pool.get_stats()
    assert stats["connections_capped"] == 1
    assert sum("refused a connection with" in r.getMessage() for r in caplog.records) == 1
    # It grows again when the server allows.
    limited.limit = 4
    holding = []

    def hold():
        lease = pool.checkout(limited.open)
        holding.append(lease)
        wait_until(lambda: len(holding) == 4)
        pool.checkin(lease)

    gevent.joinall([gevent.spawn(hold) for _ in range(4)], raise_error=True)
    assert len({lease.connection for lease in holding}) == 4


def test_an_error_that_is_not_the_servers_reaches_the_caller(server):
    pool = make_pool(max_size=1)

    def broken_hook(reconnect):
        raise RuntimeError("secrets store is sealed")

    with pytest.raises(RuntimeError, match="sealed"):
        pool.checkout(broken_hook)
    assert pool.get_stats()["pool_size"] == 0
    assert pool.checkout(server.open, timeout=2).active


def test_min_size_is_opened_in_the_background_and_kept(server):
    pool = make_pool(max_size=4, min_size=2, max_idle=0.3, opener=server.open)
    wait_until(lambda: pool.get_stats()["pool_available"] == 2)
    assert pool.get_stats()["requests_num"] == 0
    # Past MAX_IDLE, the sweeper keeps them (they are the minimum).
    gevent.sleep(0.8)
    assert pool.get_stats()["pool_available"] == 2
    assert len(server.opened) == 2
    # A lost one is replaced.
    server.opened[0].server_goes_away()
    wait_until(lambda: server.open_now == 2 and len(server.opened) == 3)
    pool.close()


def test_resize_keeps_min_size_within_the_cap_and_restores_it(server):
    pool = make_pool(max_size=4, min_size=3, opener=server.open)
    pool.resize(2)
    assert pool.get_stats()["pool_min"] == 2
    pool.resize(4)
    assert pool.get_stats()["pool_min"] == 3
    pool.close()


def test_keepalive_pings_idle_connections(server):
    pool = make_pool(max_size=2, keepalive_interval=0.3, opener=server.open)
    pool.checkin(pool.checkout())
    raw = server.opened[0]
    wait_until(lambda: raw.pings >= 2)
    assert pool.get_stats()["checks_keepalive"] >= 2
    pool.close()


def test_holder_greenlet_ending_without_checkin_is_reclaimed(server):
    pool = make_pool(max_size=1)
    leases = []
    gevent.spawn(lambda: leases.append(pool.checkout(server.open))).join()
    wait_until(lambda: pool.get_stats()["connections_reclaimed"] == 1)
    assert not leases[0].active
    assert pool.get_stats()["pool_available"] == 1


def test_greenlet_killed_while_its_return_rolls_back_loses_no_slot(server):
    pool = make_pool(max_size=1, timeout=1.0)
    lease = pool.checkout(server.open)
    raw = lease.connection
    raw.status = TransactionStatus.INTRANS
    raw.rollback_delay = 5.0
    returning = gevent.spawn(pool.checkin, lease)
    gevent.sleep(0.05)  # it runs into the (slow) rollback and yields there
    assert not returning.dead
    returning.kill()

    assert raw.closed, "a connection whose reset was interrupted must not be reused"
    stats = pool.get_stats()
    assert stats["pool_size"] == 0
    assert stats["returns_bad"] == 1
    again = pool.checkout(server.open)  # the slot is free again, no PoolTimeout
    assert again.connection is not raw
    pool.checkin(again)


def test_a_cancel_that_ends_in_a_forked_child_frees_no_slot_there(server):
    """A query cancelled at return (in a greenlet of its own) while the process forks.

    The child forgets the parent's slots (``forget_after_fork``); the cancelling
    greenlet, which the child inherits, must not free the slot a second time there.
    """
    pool = make_pool()
    lease = pool.checkout(server.open)
    raw = lease.connection
    raw.status = TransactionStatus.ACTIVE
    raw.cancel_delay = 0.2
    pool.checkin(lease)  # the cancel runs on, in its own greenlet
    assert pool.get_stats()["pool_size"] == 1
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            errors = []
            hub = gevent.get_hub()
            hub.handle_error = lambda *args: errors.append(args)
            wait_until(lambda: raw.cancelled, timeout=10)
            gevent.sleep(0.05)
            code = 0 if not errors and pool.get_stats()["pool_size"] == 0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0
    # The parent: cancelled, closed, slot free.
    wait_until(lambda: pool.get_stats()["pool_size"] == 0)
    assert raw.cancelled and raw.closed


# -- drain: connections out of the idle set at that instant ---------------------------


def test_drain_closes_a_connection_whose_connect_was_in_flight(server):
    """A connect begun before the drain is old: closed, and the waiter gets a fresh one."""
    pool = make_pool(max_size=1, opener=server.open)
    server.connect_gate = gevent.event.Event()
    waiter = gevent.spawn(pool.checkout)
    wait_until(lambda: server.connects_started == 1)
    pool.drain()
    server.connect_gate.set()
    lease = waiter.get(timeout=10)
    old, fresh = server.opened
    assert lease.connection is fresh
    assert old.closed
    stats = pool.get_stats()
    assert (stats["pool_size"], stats["pool_opening"], stats["requests_waiting"]) == (1, 0, 0)
    assert stats["connections_expired"] == 1
    pool.checkin(lease)
    assert pool.get_stats()["pool_available"] == 1
    assert server.open_now == 1


def test_a_connect_started_after_the_drain_is_kept(server):
    pool = make_pool(max_size=1, opener=server.open)
    pool.drain()
    lease = pool.checkout(timeout=5)
    assert lease.connection is server.opened[0]
    pool.checkin(lease)
    assert pool.checkout(timeout=5).connection is server.opened[0]


def test_drain_closes_a_connection_in_its_keepalive_round_trip(server):
    pool = make_pool(max_size=1, opener=server.open)
    pool.checkin(pool.checkout())
    (old,) = server.opened
    old.ping_gate = gevent.event.Event()
    old.server.send(b"!")  # input on an idle connection: due for a round trip
    pinging = gevent.spawn(pool.keep_alive)
    wait_until(lambda: old.pings == 1)
    waiter = gevent.spawn(pool.checkout)  # the keepalive holds the only slot
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 1)
    pool.drain()
    old.ping_gate.set()
    assert pinging.get(timeout=10) == 0
    lease = waiter.get(timeout=10)
    assert lease.connection is server.opened[1]
    assert old.closed
    assert pool.get_stats()["pool_size"] == 1
    pool.checkin(lease)
    assert server.open_now == 1


def test_drain_closes_a_connection_in_its_health_check(server):
    pool = make_pool(max_size=1, opener=server.open, health_check_delay=0.0)
    pool.checkin(pool.checkout())
    (old,) = server.opened
    old.ping_gate = gevent.event.Event()
    checking = gevent.spawn(pool.checkout)
    wait_until(lambda: old.pings == 2)  # the first checkout's check, then this one's
    pool.drain()
    old.ping_gate.set()
    lease = checking.get(timeout=10)
    assert lease.connection is server.opened[1]
    assert old.closed
    stats = pool.get_stats()
    assert (stats["pool_size"], stats["requests_errors"], stats["connections_lost"]) == (1, 0, 0)
    pool.checkin(lease)
    assert server.open_now == 1


def test_drain_closes_a_connection_handed_to_a_waiter_not_yet_resumed(server):
    pool = make_pool(max_size=1, opener=server.open)
    holder = pool.checkout()
    waiter = gevent.spawn(pool.checkout)
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 1)
    pool.checkin(holder)  # handed over; the waiter runs only when this greenlet yields
    pool.drain()
    lease = waiter.get(timeout=10)
    assert lease.connection is server.opened[1]
    assert holder.connection.closed
    assert pool.get_stats()["pool_size"] == 1
    pool.checkin(lease)
    assert server.open_now == 1


def test_drain_closes_a_connection_in_use_when_it_is_returned(server):
    pool = make_pool(max_size=2, opener=server.open)
    held = pool.checkout()
    pool.drain()
    pool.checkin(held)
    assert held.connection.closed
    assert pool.get_stats()["pool_size"] == 0
    assert pool.checkout().connection is server.opened[1]


def test_one_frozen_idle_connection_costs_itself_not_the_request(server):
    """A round trip at every checkout; the idle connection served first never answers.

    While other idle connections could serve, its round trip gets half of the time
    left; the next idle connection is checked with the other half and served. Before,
    the frozen one spent the whole deadline and the request got a PoolTimeout with
    two healthy connections idle.
    """
    pool = make_pool(max_size=3, health_check_delay=0.0, timeout=2.0)
    leases = [pool.checkout(server.open) for _ in range(3)]
    for lease in leases:
        pool.checkin(lease)
    frozen = leases[-1].connection  # given back last: served first
    frozen.ping_gate = gevent.event.Event()  # never set: no answer
    try:
        lease = pool.checkout(server.open)
    finally:
        frozen.ping_gate.set()
    assert lease.connection is not frozen
    assert frozen.closed
    stats = pool.get_stats()
    assert stats["connections_lost"] == 1
    assert stats["checks_roundtrip"] == 3 + 2  # three checkouts before, then two
    pool.checkin(lease)
    assert pool.get_stats()["pool_available"] == 2


def test_a_frozen_connection_with_no_other_idle_one_gets_the_whole_deadline(server):
    """Nothing else to try: the round trip may use all the time left (a slow server)."""
    pool = make_pool(max_size=1, health_check_delay=0.0, timeout=4.0)
    pool.checkin(pool.checkout(server.open))
    (slow,) = server.opened
    slow.ping_gate = gevent.event.Event()
    answered = gevent.spawn_later(2.6, slow.ping_gate.set)  # later than half the timeout
    lease = pool.checkout(server.open)
    assert lease.connection is slow
    assert pool.get_stats()["connections_lost"] == 0
    pool.checkin(lease)
    answered.join()
