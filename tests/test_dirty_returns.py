"""Connections come back dirty; the next checkout still gets a clean one."""

from __future__ import annotations

import uuid

import gevent
import pytest
from django.db import DatabaseError, connection, transaction
from django.db.backends.postgresql.psycopg_any import is_psycopg3
from gevent.event import Event

from django_db_geventpool import get_stats
from django_db_geventpool.backends.drivers import driver_ops
from django_db_geventpool.pool import TransactionStatus
from tests.support.eventually import wait_until
from tests.support.helpers import pool_backends, raw_connect, wait_until_gone, wait_until_running
from tests.testapp.models import Item

# A server backend busy in pg_sleep notices that its client closed the
# connection only if told to check (PostgreSQL 14+); otherwise it would
# linger until the query ends.
NOTICE_CLOSED_CLIENTS = "-c client_connection_check_interval=50"


@pytest.fixture
def observer():
    conn = raw_connect()
    yield conn
    conn.close()


def _row_exists(name: str) -> bool:
    try:
        return Item.objects.filter(name=name).exists()
    finally:
        connection.close()


def _next_checkout_is_clean() -> int:
    """Check out in a new greenlet; assert the raw connection is idle and in autocommit."""

    def check() -> int:
        try:
            connection.ensure_connection()
            raw = connection.connection
            assert driver_ops().transaction_status(raw) == TransactionStatus.IDLE
            assert raw.autocommit is True
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                return cursor.fetchone()[0]
        finally:
            connection.close()

    return gevent.spawn(check).get(timeout=30)


def test_greenlet_killed_inside_atomic_leaves_nothing_behind(configure_pool, observer):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=10)
    name = uuid.uuid4().hex
    inserted = Event()

    def doomed() -> None:
        with transaction.atomic():
            Item.objects.create(name=name)
            inserted.set()
            gevent.sleep(30)

    greenlet = gevent.spawn(doomed)
    assert inserted.wait(30)
    greenlet.kill()
    wait_until(lambda: get_stats()["pool_size"] == get_stats()["pool_available"])
    assert pool_backends(observer, "idle in transaction") == []
    assert not _row_exists(name)
    _next_checkout_is_clean()  # MAX_CONNS=1: only possible if the slot came back


def test_greenlet_killed_during_a_query_inside_atomic(configure_pool, observer):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=10, options=NOTICE_CLOSED_CLIENTS)
    name = uuid.uuid4().hex
    inserted = Event()
    pids = []

    def doomed() -> None:
        with transaction.atomic():
            Item.objects.create(name=name)
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids.append(cursor.fetchone()[0])
                inserted.set()
                cursor.execute("SELECT pg_sleep(30)")

    greenlet = gevent.spawn(doomed)
    assert inserted.wait(30)
    wait_until_running(observer, "SELECT pg_sleep(30)")  # the server is in the query now
    greenlet.kill()
    # The connection of the killed query is closed, not reused; the server
    # ends that backend and rolls back its transaction.
    wait_until(lambda: get_stats()["pool_size"] == get_stats()["pool_available"])
    assert _next_checkout_is_clean() != pids[0]
    wait_until_gone(observer, pids[0])
    assert not _row_exists(name)
    assert pool_backends(observer, "idle in transaction") == []


def test_autocommit_off_and_never_committed(configure_pool):
    configure_pool(MAX_CONNS=1)
    name = uuid.uuid4().hex
    connection.set_autocommit(False)
    Item.objects.create(name=name)
    raw = connection.connection
    connection.close()

    # Back in the pool: rolled back and in autocommit again.
    assert driver_ops().transaction_status(raw) == TransactionStatus.IDLE
    assert raw.autocommit is True
    assert get_stats()["pool_available"] == 1
    assert not _row_exists(name)
    assert connection.get_autocommit() is True  # a new checkout, in Django's default mode
    connection.close()
    _next_checkout_is_clean()


def test_failed_transaction_is_rolled_back_on_return(configure_pool):
    configure_pool(MAX_CONNS=1)
    connection.set_autocommit(False)
    with pytest.raises(DatabaseError):
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")
    raw = connection.connection
    assert driver_ops().transaction_status(raw) == TransactionStatus.INERROR
    connection.close()

    assert driver_ops().transaction_status(raw) == TransactionStatus.IDLE
    assert raw.autocommit is True
    assert get_stats()["pool_available"] == 1
    assert get_stats()["returns_bad"] == 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    assert connection.connection is raw  # rolled back and reused, not replaced
    connection.close()
    _next_checkout_is_clean()


def _query_interrupted_by_a_timeout(observer, sleep_seconds: int) -> tuple[int, object]:
    """A request whose ``pg_sleep(sleep_seconds)`` a `gevent.Timeout` interrupts.

    The timeout is raised in the request's greenlet once the server shows the query
    running (not after a fixed delay that a slow connect could outlast); the request
    then ends as a view does, giving its connection back. Returns the interrupted
    backend's pid and the raw connection it used.
    """
    sql = f"SELECT pg_sleep({int(sleep_seconds)})"
    seen: dict[str, object] = {}

    def request() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                seen["pid"] = cursor.fetchone()[0]
                seen["raw"] = connection.connection
                cursor.execute(sql)
        except gevent.Timeout as exc:
            seen["interrupted"] = exc
        finally:
            connection.close()

    greenlet = gevent.spawn(request)
    wait_until_running(observer, sql)
    greenlet.kill(gevent.Timeout(), block=True, timeout=30)
    assert isinstance(seen.get("interrupted"), gevent.Timeout), seen
    return seen["pid"], seen["raw"]  # type: ignore[return-value]


def test_query_interrupted_by_a_timeout_is_closed_not_reused(configure_pool, observer):
    configure_pool(MAX_CONNS=1, options=NOTICE_CLOSED_CLIENTS)
    interrupted_pid, raw = _query_interrupted_by_a_timeout(observer, sleep_seconds=5)

    # Closed once its query is cancelled, by a greenlet of the pool (not the caller's).
    wait_until(lambda: driver_ops().is_closed(raw))
    assert get_stats()["returns_bad"] + get_stats()["connections_lost"] >= 1
    assert get_stats()["pool_size"] == 0
    wait_until_gone(observer, interrupted_pid)
    assert _next_checkout_is_clean() != interrupted_pid


if is_psycopg3:
    # psycopg2 closes the connection itself when a wait is interrupted, so only
    # the server can notice (NOTICE_CLOSED_CLIENTS above); with psycopg 3 the
    # pool cancels the query before it closes the connection.

    def test_interrupted_query_is_cancelled_in_the_server(configure_pool, observer):
        configure_pool(MAX_CONNS=1)
        interrupted_pid, _ = _query_interrupted_by_a_timeout(observer, sleep_seconds=60)
        # Without the cancel, this backend would sleep on for a minute: a server
        # connection beyond MAX_CONNS once the pool opens a replacement.
        wait_until_gone(observer, interrupted_pid)
        assert _next_checkout_is_clean() != interrupted_pid
