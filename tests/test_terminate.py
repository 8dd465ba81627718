"""Idle pooled connections killed by the server are replaced without an error."""

from __future__ import annotations

import gevent
import gevent.event
from django.db import connection

from django_db_geventpool import get_stats
from tests.support.helpers import pool_pids, raw_connect, request_pid, terminate_backend


def _fill_pool(size: int) -> set[int]:
    """``size`` requests that hold their connections until all have one: ``size`` pids.

    A barrier, not a server-side sleep: on a loaded machine one connect can take
    longer than another request's whole query, and that request's connection would
    then serve the late one.
    """
    all_in = gevent.event.Event()
    pids: list[int] = []

    def request() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids.append(cursor.fetchone()[0])
            if len(pids) == size:
                all_in.set()
            assert all_in.wait(30), "the connections were never all held at once"
        finally:
            connection.close()

    greenlets = [gevent.spawn(request) for _ in range(size)]
    gevent.joinall(greenlets, raise_error=True)
    return set(pids)


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
