"""An exhausted pool: bounded waits, a useful error, fair and lossless waiting."""

from __future__ import annotations

import re
from time import monotonic

import gevent
import pytest
from django.db import OperationalError, connection, transaction
from gevent.event import Event

from django_db_geventpool import PoolTimeout, get_stats
from tests.support.eventually import wait_until
from tests.support.helpers import (
    backend_pid,
    checkout_timeout,
    request_pid,
    terminate_backend,
)


def _hold(seconds: float) -> None:
    """A request that keeps its connection busy in the server for ``seconds``."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(%s)", [seconds])
    finally:
        connection.close()


def _hold_until(release: Event, holding: Event) -> None:
    """A request that keeps its connection checked out until ``release`` is set.

    Released by the test, not after a fixed time: on a loaded machine a timed hold
    could end before the checkouts it must outlast have even queued.
    """
    try:
        connection.ensure_connection()
        holding.set()
        assert release.wait(60), "never released"
    finally:
        connection.close()


def _checkout() -> None:
    # ``connection`` is per greenlet: looked up here, in the greenlet that checks out.
    connection.ensure_connection()


def _queued(count: int) -> None:
    """Wait until ``count`` checkouts wait in the pool's queue."""
    wait_until(lambda: get_stats()["requests_waiting"] == count)


def _start_holders(count: int) -> tuple[list[gevent.Greenlet], Event]:
    """``count`` requests holding their connections; set the event to release them."""
    release = Event()
    holders = []
    for _ in range(count):
        holding = Event()
        holders.append(gevent.spawn(_hold_until, release, holding))
        assert holding.wait(30), "a holder never got its connection"
    return holders, release


def test_checkout_times_out_with_a_message_that_explains(configure_pool):
    # A generous POOL_TIMEOUT for the holders' connects, a short one for the test.
    configure_pool(MAX_CONNS=2, POOL_TIMEOUT=30)
    holders, release = _start_holders(2)

    with checkout_timeout(0.5):
        started = monotonic()
        with pytest.raises(PoolTimeout) as excinfo:
            connection.ensure_connection()
        waited = monotonic() - started

    error = excinfo.value
    assert isinstance(error, OperationalError)
    assert isinstance(error, TimeoutError)
    message = str(error)
    assert "'default'" in message
    assert "MAX_CONNS=2" in message
    assert "2 in use" in message
    assert "0 other checkouts waiting" in message
    reported = re.search(r"after (\d+\.\d+)s", message)
    assert reported is not None
    # Lower bounds only (timers may fire a few ms early on the loop's clock).
    assert float(reported.group(1)) >= 0.45
    assert waited >= 0.45
    assert waited < 0.5 + 5  # generous: it gave up long before the holders let go
    release.set()
    gevent.joinall(holders, raise_error=True)
    assert get_stats()["requests_errors"] == 1
    # The pool is fine afterwards.
    assert backend_pid() > 0


def test_message_counts_the_other_waiters(configure_pool):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=30)
    holders, release = _start_holders(1)
    # The first waiter waits up to the generous POOL_TIMEOUT, so it is still waiting
    # when the second one gives up, however slowly this machine runs.
    first = gevent.spawn(request_pid)
    _queued(1)
    with checkout_timeout(0.3):
        with pytest.raises(PoolTimeout, match="1 other checkouts waiting"):
            connection.ensure_connection()
        first.kill(timeout=30)
        _queued(0)
        with pytest.raises(PoolTimeout, match="0 other checkouts waiting"):
            connection.ensure_connection()
    release.set()
    gevent.joinall(holders, raise_error=True)


def test_waiter_is_served_when_a_holder_connection_is_discarded(configure_pool):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=5)
    holder_pid = []
    holding = Event()
    release = Event()

    def holder_closes_inside_atomic():
        with transaction.atomic():
            holder_pid.append(backend_pid())
            holding.set()
            release.wait(30)
            # Closed inside atomic(): the pool must discard it, not reuse it.
            connection.close()

    holder = gevent.spawn(holder_closes_inside_atomic)
    holding.wait(30)
    waiting = gevent.spawn(request_pid)
    _queued(1)
    release.set()
    waiter_pid = waiting.get(timeout=30)
    holder.get(timeout=30)
    assert waiter_pid != holder_pid[0]
    stats = get_stats()
    assert stats["connections_num"] == 2
    assert stats["requests_errors"] == 0
    assert stats["pool_size"] == 1


def test_waiter_is_served_when_the_holder_gives_back_a_terminated_connection(configure_pool):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=5)
    holder_pid = []
    holding = Event()
    killed = Event()

    def holder():
        try:
            holder_pid.append(backend_pid())
            holding.set()
            killed.wait(30)
            with pytest.raises(OperationalError):
                backend_pid()
        finally:
            connection.close()

    holding_greenlet = gevent.spawn(holder)
    holding.wait(30)
    waiting = gevent.spawn(request_pid)
    _queued(1)
    terminate_backend(holder_pid[0])
    killed.set()
    holding_greenlet.get(timeout=30)
    assert waiting.get(timeout=30) != holder_pid[0]
    assert get_stats()["pool_size"] == 1


def test_waiters_are_served_in_arrival_order(configure_pool):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=5)
    holders, release = _start_holders(1)
    order = []

    def request(number):
        try:
            backend_pid()
            order.append(number)
        finally:
            connection.close()

    waiters = []
    for number in range(6):
        waiters.append(gevent.spawn(request, number))
        _queued(number + 1)  # queued in this order
    release.set()
    gevent.joinall(holders + waiters, raise_error=True, timeout=60)
    assert order == list(range(6))


def test_killed_waiter_does_not_lose_the_slot(configure_pool):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=5)
    holders, release = _start_holders(1)
    doomed = gevent.spawn(_checkout)
    _queued(1)
    doomed.kill()
    release.set()
    gevent.joinall(holders, raise_error=True)
    stats = get_stats()
    assert stats["requests_waiting"] == 0
    assert stats["pool_available"] == 1
    assert stats["pool_size"] == 1
    # With MAX_CONNS=1 this only succeeds if the slot came back.
    assert gevent.spawn(_hold, 0).get(timeout=30) is None
    assert get_stats()["requests_errors"] == 0


def test_waiter_killed_as_it_is_served_does_not_lose_the_slot(configure_pool):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=5)
    release = Event()
    holding = Event()

    def holder():
        try:
            backend_pid()
            holding.set()
            release.wait(30)
        finally:
            connection.close()

    holding_greenlet = gevent.spawn(holder)
    holding.wait(30)
    doomed = gevent.spawn(_checkout)
    _queued(1)
    release.set()
    holding_greenlet.join(30)  # the slot is handed to the waiter here
    doomed.kill()
    wait_until(lambda: get_stats()["pool_available"] == 1)
    assert get_stats()["pool_size"] == 1
    assert gevent.spawn(_hold, 0).get(timeout=30) is None
