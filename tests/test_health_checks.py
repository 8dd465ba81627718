"""The two health-check tiers, counted by the pool and by the server.

The server counts every transaction of a database in ``pg_stat_database.xact_commit``,
and an empty query (psycopg 3's ping) or ``SELECT 1`` (psycopg2's) is one. A
backend publishes its counts lazily, so every measurement ends with `FLUSH` on the
pooled connection itself: it touches a catalog table (so there is something to
publish) and forces the publication before the server answers. The observer
reads the counter from another database, so its own queries do not count.
"""

from __future__ import annotations

import gevent
import pytest
from django.db import connection

from django_db_geventpool import get_stats
from django_db_geventpool.backends.options import parse_pool_settings
from tests.support.helpers import query, raw_connect

# One transaction, and after it the backend's counters are visible to others.
FLUSH = "SELECT pg_stat_force_next_flush() FROM pg_namespace LIMIT 1"


@pytest.fixture(scope="module", autouse=True)
def no_autovacuum(cluster):
    """Autovacuum workers would add transactions of their own to the counter."""
    cluster.psql("ALTER SYSTEM SET autovacuum = off")
    cluster.psql("SELECT pg_reload_conf()")
    yield
    cluster.psql("ALTER SYSTEM RESET autovacuum")
    cluster.psql("SELECT pg_reload_conf()")


@pytest.fixture
def server_transactions():
    """Transactions the server committed in the test database so far."""
    observer = raw_connect(dbname="postgres")

    def count() -> int:
        rows = query(
            observer,
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
            [connection.settings_dict["NAME"]],
        )
        return rows[0][0]

    yield count
    observer.close()


def _checkout_and_return() -> None:
    """A checkout that runs no query of its own."""

    def request() -> None:
        try:
            connection.ensure_connection()
        finally:
            connection.close()

    gevent.spawn(request).get(timeout=30)


def _flush_request() -> None:
    """A checkout that runs FLUSH (one transaction of its own)."""

    def request() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute(FLUSH)
        finally:
            connection.close()

    gevent.spawn(request).get(timeout=30)


def _measure(server_transactions, action) -> tuple[int, int]:
    """(server transactions, pool round trips) caused by ``action`` plus one FLUSH request."""
    _flush_request()
    before_server = server_transactions()
    before_pool = get_stats()["checks_roundtrip"]
    action()
    _flush_request()
    return server_transactions() - before_server, get_stats()["checks_roundtrip"] - before_pool


def test_reuse_within_the_delay_costs_no_round_trip(configure_pool, server_transactions):
    configure_pool(MAX_CONNS=1, HEALTH_CHECK_DELAY=30)

    def five_checkouts() -> None:
        for _ in range(5):
            _checkout_and_return()

    server, pool = _measure(server_transactions, five_checkouts)
    assert pool == 0
    assert server == 1  # the FLUSH request only
    assert get_stats()["connections_num"] == 1


def test_idle_longer_than_the_delay_gets_exactly_one(configure_pool, server_transactions):
    # The delay (2 s) is long enough that the second checkout and the FLUSH request,
    # right after the first, are within it even on a busy machine; the idle time
    # before the first is what the test is about, so a sleep is the condition itself.
    configure_pool(MAX_CONNS=1, HEALTH_CHECK_DELAY=2.0)

    def idle_then_checkout() -> None:
        gevent.sleep(2.2)
        _checkout_and_return()  # one round trip here...
        _checkout_and_return()  # ...and none here: it was just used

    server, pool = _measure(server_transactions, idle_then_checkout)
    assert pool == 1
    assert server == 2  # the round trip, then FLUSH
    assert get_stats()["connections_num"] == 1


def test_delay_zero_checks_every_checkout(configure_pool, server_transactions):
    configure_pool(MAX_CONNS=1, HEALTH_CHECK_DELAY=0)

    def three_checkouts() -> None:
        for _ in range(3):
            _checkout_and_return()

    server, pool = _measure(server_transactions, three_checkouts)
    assert pool == 4  # three checkouts, and the FLUSH request's checkout
    assert server == 5


def test_delay_none_never_pays_a_round_trip(configure_pool, server_transactions):
    configure_pool(MAX_CONNS=1, HEALTH_CHECK_DELAY=None)
    # Idle for longer than the default delay: with the default, this checkout would pay
    # a round trip, so the test fails if None is read as "use the default".
    default_delay = parse_pool_settings("default", {"NAME": "db", "OPTIONS": {}}).health_check_delay
    assert default_delay is not None

    def idle_then_checkouts() -> None:
        gevent.sleep(default_delay + 0.2)
        for _ in range(3):
            _checkout_and_return()

    server, pool = _measure(server_transactions, idle_then_checkouts)
    assert pool == 0
    assert server == 1
