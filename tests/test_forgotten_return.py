"""Greenlets that never give their connection back do not shrink the pool for good."""

from __future__ import annotations

import gc

import gevent
import greenlet
from django.db import connection

from django_db_geventpool import get_stats
from tests.support.eventually import wait_until


def _query_and_forget() -> int:
    """Use the connection and end without closing it (no close_connection either)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def _query_and_close() -> int:
    try:
        return _query_and_forget()
    finally:
        connection.close()


def test_ten_forgetful_greenlets_in_a_row(configure_pool):
    configure_pool(MAX_CONNS=2, POOL_TIMEOUT=10)
    for _ in range(10):
        gevent.spawn(_query_and_forget).get(timeout=30)
    wait_until(lambda: get_stats()["connections_reclaimed"] == 10)
    greenlets = [gevent.spawn(_query_and_close) for _ in range(20)]
    gevent.joinall(greenlets, raise_error=True)
    stats = get_stats()
    assert stats["requests_errors"] == 0
    assert stats["pool_size"] <= 2
    assert stats["pool_available"] == stats["pool_size"]


def test_forgetful_greenlets_at_once_with_waiters(configure_pool):
    configure_pool(MAX_CONNS=2, POOL_TIMEOUT=10)
    # Ten at once: eight of them wait, and are served by the reclaimed slots.
    greenlets = [gevent.spawn(_query_and_forget) for _ in range(10)]
    gevent.joinall(greenlets, raise_error=True)
    wait_until(lambda: get_stats()["connections_reclaimed"] == 10)
    assert gevent.spawn(_query_and_close).get(timeout=30) > 0
    assert get_stats()["requests_errors"] == 0


def test_raw_greenlet_connection_comes_back_when_garbage_collected(configure_pool):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=10)
    # A plain greenlet (not a gevent Greenlet) cannot be watched for its end;
    # its Django connection object is the owner whose collection returns the slot.
    raw = greenlet.greenlet(_query_and_forget)
    pid = raw.switch()
    assert raw.dead
    assert get_stats()["pool_available"] == 0
    del raw

    def collected_and_reclaimed() -> bool:
        # The greenlet-local holding its wrapper is dropped by the hub; then the
        # wrapper (in reference cycles) needs a collection.
        gc.collect()
        return get_stats()["connections_reclaimed"] == 1

    wait_until(collected_and_reclaimed)
    assert get_stats()["pool_available"] == 1
    # MAX_CONNS=1: the same server connection serves the next request.
    assert gevent.spawn(_query_and_close).get(timeout=30) == pid
