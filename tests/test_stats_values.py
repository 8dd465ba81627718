"""Every documented stats key, checked by value against a workload whose answer is known.

The keys are those of README.md and docs/observability.md. Counters are compared as
deltas over one workload; durations (``_ms``) between a lower bound the workload
guarantees (a hold, a timeout or a connect delay the test imposes) and an upper bound
measured around the calls by the test itself. Keys that other files already pin by
value for their own workload are listed in ``CHECKED_ELSEWHERE``.
"""

from __future__ import annotations

from time import monotonic
from unittest import mock

import gevent
import gevent.event
import pytest
from django.db import connection
from django.db.backends.postgresql.base import DatabaseWrapper as DjangoPostgreSQLWrapper

from django_db_geventpool import get_stats
from django_db_geventpool.errors import PoolTimeout
from django_db_geventpool.pool import COUNTER_KEYS
from tests.support.eventually import wait_until
from tests.support.helpers import checkout_timeout

HOLD = 0.3  # how long the holder keeps the only connection once the waiters queued
WAITERS = 3
CONNECT_DELAY = 0.2  # added to every connect by the test

# Key -> the test that pins it by value for a workload of its own.
CHECKED_ELSEWHERE = {
    "connections_lost": "test_terminate.py (one per killed idle backend)",
    "connections_expired": "test_idle_connections.py (MAX_IDLE / MAX_LIFETIME sweeper)",
    "connections_reclaimed": "test_leaks.py (one per greenlet that ended holding one)",
    "connections_leaked": "test_leaks.py (one per LEAK_TIMEOUT report)",
    "returns_bad": "test_dirty_returns.py (a connection returned mid-query)",
    "checks_roundtrip": "test_health_checks.py (counted against pg_stat_database)",
    "requests_timeouts": "test_metrics_export.py (one forced PoolTimeout)",
    "connections_capped": "test_connect_faults.py (one per 'refused a connection' WARNING)",
    "connections_read_only": "test_read_only.py (connections closed on a read-only server)",
    "checks_keepalive": "test_warm_keepalive.py (round trips on idle connections)",
    "pool_min": "test_warm_keepalive.py (MIN_CONNS)",
    "pool_opening": "test_connect_faults.py (0 once every connect has ended)",
}
CHECKED_HERE = {
    "pool_max",
    "pool_size",
    "pool_available",
    "requests_waiting",
    "requests_num",
    "requests_queued",
    "requests_wait_ms",
    "requests_errors",
    "connections_num",
    "connections_ms",
    "connections_errors",
}


def _documented_keys() -> set[str]:
    return set(COUNTER_KEYS) | {
        "pool_max",
        "pool_min",
        "pool_size",
        "pool_available",
        "pool_opening",
        "requests_waiting",
    }


def test_every_documented_key_is_checked_by_value_somewhere():
    assert CHECKED_HERE | set(CHECKED_ELSEWHERE) == _documented_keys()
    assert set(get_stats()) >= _documented_keys()


@pytest.fixture
def slow_connects():
    """Every connect takes at least CONNECT_DELAY longer; the connect durations measured."""
    real = DjangoPostgreSQLWrapper.get_new_connection
    durations: list[float] = []

    def delayed(self, conn_params):
        started = monotonic()
        gevent.sleep(CONNECT_DELAY)
        try:
            return real(self, conn_params)
        finally:
            durations.append(monotonic() - started)

    with mock.patch.object(DjangoPostgreSQLWrapper, "get_new_connection", delayed):
        yield durations


def _checkout() -> None:
    # Looked up in the request's greenlet: ``connection`` is per greenlet.
    connection.ensure_connection()


def _in_request(action):
    def request():
        try:
            return action()
        finally:
            connection.close()

    return gevent.spawn(request)


def test_queue_wait_and_connect_figures(configure_pool, slow_connects):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=30, HEALTH_CHECK_DELAY=None)
    holding = gevent.event.Event()
    release = gevent.event.Event()
    first_checkout: list[float] = []

    def hold():
        started = monotonic()
        connection.ensure_connection()  # the one connect of the workload
        first_checkout.append(monotonic() - started)
        holding.set()
        release.wait(30)

    waited: list[float] = []

    def wait_then_query():
        started = monotonic()
        connection.ensure_connection()
        waited.append(monotonic() - started)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    holder = _in_request(hold)
    assert holding.wait(30)
    stats = get_stats()
    assert (stats["pool_max"], stats["pool_size"], stats["pool_available"]) == (1, 1, 0)
    assert stats["requests_waiting"] == 0

    # The holder queued too: a checkout that needs a new connection waits for the
    # pool's connector to open it.
    assert stats["requests_queued"] == 1
    waiters = [_in_request(wait_then_query) for _ in range(WAITERS)]
    wait_until(lambda: get_stats()["requests_waiting"] == WAITERS)
    assert get_stats()["requests_queued"] == 1 + WAITERS
    gevent.sleep(HOLD)  # every waiter now waits at least HOLD
    release.set()
    gevent.joinall([holder, *waiters], raise_error=True, timeout=30)

    stats = get_stats()
    assert stats["requests_num"] == 1 + WAITERS
    assert stats["requests_queued"] == 1 + WAITERS
    assert stats["requests_waiting"] == 0
    assert stats["requests_errors"] == 0
    # The holder waited through the connect, each waiter through the hold (and the
    # later ones through the earlier ones' queries too); the pool's total is no more
    # than the test measured.
    least_wait_ms = (CONNECT_DELAY + WAITERS * HOLD) * 1000
    most_wait_ms = (first_checkout[0] + sum(waited)) * 1000 + 1 + WAITERS
    assert least_wait_ms <= stats["requests_wait_ms"] <= most_wait_ms
    # One connection served everyone: one connect, slowed by CONNECT_DELAY.
    assert stats["connections_num"] == 1
    assert stats["connections_errors"] == 0
    assert len(slow_connects) == 1
    assert slow_connects[0] >= CONNECT_DELAY
    assert CONNECT_DELAY * 1000 <= stats["connections_ms"] <= first_checkout[0] * 1000 + 1
    assert (stats["pool_size"], stats["pool_available"]) == (1, 1)
    # The documented formulas (docs/observability.md) give the workload's answers.
    assert stats["requests_wait_ms"] / stats["requests_queued"] >= least_wait_ms / (1 + WAITERS)
    assert stats["connections_ms"] / stats["connections_num"] >= CONNECT_DELAY * 1000


def test_a_timed_out_checkout_counts_its_wait_and_an_error(configure_pool):
    pool_timeout = 0.5
    # The holder's connect under a generous POOL_TIMEOUT; only the checkout that
    # must time out waits ``pool_timeout``.
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=30)
    holding = gevent.event.Event()
    release = gevent.event.Event()

    def hold():
        connection.ensure_connection()
        holding.set()
        release.wait(30)

    holder = _in_request(hold)
    assert holding.wait(30)
    before = get_stats()
    started = monotonic()
    with checkout_timeout(pool_timeout), pytest.raises(PoolTimeout):
        _in_request(_checkout).get(timeout=30)
    elapsed = monotonic() - started
    release.set()
    holder.get(timeout=30)

    stats = get_stats()
    assert stats["requests_num"] - before["requests_num"] == 1
    assert stats["requests_queued"] - before["requests_queued"] == 1
    assert stats["requests_errors"] - before["requests_errors"] == 1
    wait_ms = stats["requests_wait_ms"] - before["requests_wait_ms"]
    # Lower bound less a few ms: the pool's wait starts just after the checkout did.
    assert pool_timeout * 1000 - 20 <= wait_ms <= elapsed * 1000 + 1
    assert stats["connections_num"] == before["connections_num"]  # no connect was tried


def _refusing_connects(failures: int | None):
    """Patch connects to fail ``failures`` times (None: always), then connect for real."""
    real = DjangoPostgreSQLWrapper.get_new_connection
    failures_left = [failures]

    def flaky(self, conn_params):
        if failures_left[0] is None or failures_left[0] > 0:
            if failures_left[0] is not None:
                failures_left[0] -= 1
            from django.db.backends.postgresql.psycopg_any import is_psycopg3

            if is_psycopg3:
                import psycopg

                raise psycopg.OperationalError("refused by the test")
            import psycopg2

            raise psycopg2.OperationalError("refused by the test")
        return real(self, conn_params)

    return mock.patch.object(DjangoPostgreSQLWrapper, "get_new_connection", flaky)


def test_failed_connects_count_attempts_and_errors_but_the_request_waits(configure_pool):
    configure_pool(MAX_CONNS=2, CONNECT_RETRIES=1, CONNECT_RETRY_DELAY=0.01)
    # One quick retry, then the pool-wide backoff probes one connect at a time:
    # attempts 1 and 2 (quick retry) fail, probe 3 fails, probe 4 connects.
    with _refusing_connects(3):
        _in_request(_checkout).get(timeout=30)

    stats = get_stats()
    assert stats["requests_num"] == 1
    assert stats["requests_queued"] == 1
    assert stats["requests_errors"] == 0
    assert stats["connections_num"] == 4
    assert stats["connections_errors"] == 3
    assert (stats["pool_size"], stats["pool_available"]) == (1, 1)


def test_a_checkout_that_outlives_failing_connects_is_one_failed_request(configure_pool):
    configure_pool(MAX_CONNS=2, POOL_TIMEOUT=0.5, CONNECT_RETRY_DELAY=0.01)
    with _refusing_connects(None):
        with pytest.raises(PoolTimeout, match="refused by the test") as raised:
            _in_request(_checkout).get(timeout=30)
    assert "refused by the test" in str(raised.value.__cause__)  # the driver's error, chained
    wait_until(lambda: get_stats()["pool_opening"] == 0)

    stats = get_stats()
    assert stats["requests_num"] == 1
    assert stats["requests_errors"] == 1
    assert stats["requests_timeouts"] == 1
    assert stats["connections_num"] >= 2
    assert stats["connections_errors"] == stats["connections_num"]
    assert (stats["pool_size"], stats["pool_available"]) == (0, 0)
