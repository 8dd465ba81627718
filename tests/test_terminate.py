"""Idle pooled connections killed by the server are replaced without an error."""

from __future__ import annotations

import gevent
from django.db import connection

from django_db_geventpool import get_stats
from tests.support.helpers import pool_pids, raw_connect, request_pid, terminate_backend


def _fill_pool(size: int) -> set[int]:
    def slow_request() -> int:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid(), pg_sleep(0.05)")
                return cursor.fetchone()[0]
        finally:
            connection.close()

    greenlets = [gevent.spawn(slow_request) for _ in range(size)]
    gevent.joinall(greenlets, raise_error=True)
    return {g.value for g in greenlets}


def test_every_idle_connection_terminated_then_200_requests_succeed(configure_pool):
    configure_pool(MAX_CONNS=4, HEALTH_CHECK_DELAY=None)  # only the local check
    pooled = _fill_pool(4)
    assert len(pooled) == 4
    assert get_stats()["pool_available"] == 4

    observer = raw_connect()
    try:
        idle = pool_pids(observer, "idle") & pooled
        assert idle == pooled  # the whole pool sits idle
        terminate_backend(*idle)

        greenlets = [gevent.spawn(request_pid) for _ in range(200)]
        gevent.joinall(greenlets)
        now_serving = pool_pids(observer)
    finally:
        observer.close()

    assert [g.exception for g in greenlets if not g.successful()] == []
    used = {g.value for g in greenlets}
    assert not used & pooled  # no request ran on a terminated backend
    assert used & now_serving
    stats = get_stats()
    # All four terminated connections were checked out again (MAX_CONNS=4,
    # 200 requests) and each was found broken by the local check.
    assert stats["connections_lost"] >= len(idle)
    assert stats["requests_errors"] == 0
    assert stats["pool_size"] <= 4


def test_terminated_connection_found_by_a_sequential_request(configure_pool):
    configure_pool(MAX_CONNS=2, HEALTH_CHECK_DELAY=None)
    pid = request_pid()
    terminate_backend(pid)
    assert request_pid() != pid
    stats = get_stats()
    assert stats["connections_lost"] == 1
    assert stats["requests_errors"] == 0
