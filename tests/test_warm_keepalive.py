"""MIN_CONNS (warm start, kept through MAX_IDLE, replaced when lost) and KEEPALIVE_INTERVAL.

* ``MIN_CONNS``: the connections are opened in the background once the pool
  exists, before any request; ``MAX_IDLE`` does not close them; one terminated by
  the server is replaced without a request finding it.
* ``KEEPALIVE_INTERVAL``: behind HAProxy with an idle timeout shorter than the
  workload's idle gap, idle connections get a round trip often enough that
  HAProxy never cuts them: the next requests get the same server sessions.
"""

from __future__ import annotations

import gevent
import pytest
from django.db import connection, connections

from django_db_geventpool import get_stats
from tests.support.eventually import wait_until
from tests.support.helpers import pool_pids, raw_connect, terminate_backend
from tests.support.proxies import HAProxy

# HAProxy's idle timeout: well above KEEPALIVE_INTERVAL (0.3 s), so that a keepalive
# that runs late on a loaded machine still comes before HAProxy's cut.
IDLE_TIMEOUT = 2.0


@pytest.fixture
def observer():
    conn = raw_connect()
    yield conn
    conn.close()


def _held_pids(count: int) -> set[int]:
    """``count`` requests holding a connection at once; their backend pids."""
    pids: list[int] = []

    def hold() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids.append(cursor.fetchone()[0])
            wait_until(lambda: len(pids) == count)
        finally:
            connection.close()

    gevent.joinall([gevent.spawn(hold) for _ in range(count)], raise_error=True)
    return set(pids)


def test_min_conns_warm_up_in_the_background_and_are_kept(configure_pool, observer):
    configure_pool(MAX_CONNS=6, MIN_CONNS=3, MAX_IDLE=0.6, HEALTH_CHECK_DELAY=None)
    pool = connections["default"].geventpool  # created, as gunicorn's post_worker_init does
    wait_until(
        lambda: len(pool_pids(observer)) == 3 and get_stats()["pool_available"] == 3, timeout=10
    )
    stats = get_stats()
    assert stats["requests_num"] == 0  # opened before, and without, any request
    assert stats["pool_available"] == 3 and stats["pool_min"] == 3
    warm = pool_pids(observer)

    # Well past MAX_IDLE (the sweeper runs every 0.3 s): the minimum stays open.
    gevent.sleep(0.6 * 3)
    assert pool_pids(observer) == warm
    assert get_stats()["connections_expired"] == 0

    # Lost while idle: replaced in the background, no request needed.
    victim = sorted(warm)[0]
    terminate_backend(victim)
    wait_until(
        lambda: len(pool_pids(observer)) == 3 and victim not in pool_pids(observer), timeout=10
    )
    assert get_stats()["requests_num"] == 0
    assert pool is connections["default"].geventpool

    # Extra connections above the minimum still expire through MAX_IDLE.
    _held_pids(5)
    wait_until(lambda: len(pool_pids(observer)) == 3, timeout=10)
    assert get_stats()["connections_expired"] >= 2


@pytest.fixture
def haproxy(cluster, fresh_pool):
    proxy = HAProxy(cluster.host, cluster.port, idle_timeout=IDLE_TIMEOUT)
    proxy.start()
    connections.settings["default"].update(HOST=proxy.host, PORT=str(proxy.port))
    try:
        yield proxy
    finally:
        connections["default"].close()
        connections["default"].close_pool()
        proxy.destroy()


@pytest.mark.parametrize("keepalive", [0.3, None], ids=["keepalive", "no-keepalive"])
def test_keepalive_keeps_idle_connections_through_an_idle_timeout(
    haproxy, configure_pool, keepalive
):
    configure_pool(MAX_CONNS=4, KEEPALIVE_INTERVAL=keepalive, HEALTH_CHECK_DELAY=None)
    first = _held_pids(4)
    assert get_stats()["pool_available"] == 4
    # An idle gap twice HAProxy's idle timeout.
    gevent.sleep(IDLE_TIMEOUT * 2)
    second = _held_pids(4)
    stats = get_stats()
    if keepalive is None:
        # The reference: without keepalive HAProxy cut all four.
        assert stats["connections_lost"] == 4
        assert not first & second
    else:
        assert second == first
        assert stats["connections_lost"] == 0
        assert stats["checks_keepalive"] >= 4
