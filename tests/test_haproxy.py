"""A real HAProxy (TCP mode, 1 s idle timeouts) between the pool and PostgreSQL.

Load balancers close connections that stay idle longer than their timeout; the
pool must notice at checkout (the socket turns readable at EOF) and replace them
without a failed request. A restarted HAProxy drops every connection at once;
requests that start once it accepts again must all succeed.
"""

import logging
from time import monotonic

import gevent
import gevent.event
import pytest
from django.db import connection, connections

from django_db_geventpool import get_stats
from tests.support import proxies
from tests.support.eventually import wait_until
from tests.support.load import Load
from tests.support.proxies import HAProxy

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = 1.0


@pytest.fixture
def haproxy(cluster, fresh_pool):
    """HAProxy in front of the session cluster; the default alias goes through it."""
    proxy = HAProxy(cluster.host, cluster.port, idle_timeout=IDLE_TIMEOUT)
    proxy.start()
    settings_dict = connections.settings["default"]
    settings_dict.update(HOST=proxy.host, PORT=str(proxy.port))
    try:
        yield proxy
    finally:
        connections["default"].close()
        connections["default"].close_pool()
        proxy.destroy()


def _hold_connections(count: int) -> list[int]:
    """Check out ``count`` connections at once, return them; their server pids."""
    pids: list[int] = []
    all_held = gevent.event.Event()

    def hold():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(cursor.fetchone()[0])
        if len(pids) == count:
            all_held.set()
        assert all_held.wait(30), "the connections were never all held at once"
        connection.close()

    gevent.joinall([gevent.spawn(hold) for _ in range(count)], raise_error=True)
    return pids


def _wait_until_haproxy_closed_the_idle_connections(count: int) -> None:
    """HAProxy's idle timeout passes; its close makes each idle socket readable (EOF)."""
    idle = list(connections["default"].geventpool._idle)
    assert len(idle) == count
    wait_until(lambda: all(conn.socket_has_input() for conn in idle), timeout=IDLE_TIMEOUT + 10)


@pytest.mark.parametrize(
    "health_check_delay", [None, 1.0], ids=["local-check-only", "roundtrip-after-1s"]
)
def test_idle_connections_closed_by_haproxy_are_replaced(
    haproxy, configure_pool, health_check_delay
):
    # None: only the local socket check can notice HAProxy's close (EOF makes
    # the socket readable); 1.0: the idle round trip would notice it too.
    configure_pool(MAX_CONNS=4, HEALTH_CHECK_DELAY=health_check_delay, CONNECT_RETRIES=0)
    first_pids = _hold_connections(4)
    assert get_stats()["pool_available"] == 4
    _wait_until_haproxy_closed_the_idle_connections(4)

    with Load(concurrency=6) as load:
        load.wait_for_requests(200)
    assert load.failures() == [], load.error_summary()
    stats = get_stats()
    assert stats["connections_lost"] == 4
    assert stats["requests_errors"] == 0
    assert stats["pool_size"] <= 4
    if health_check_delay is None:
        # No timed round trip: only the local check's finding (input on the socket)
        # triggers the one round trip that confirms each close.
        assert stats["checks_roundtrip"] == 4
    second_pids = _hold_connections(4)
    assert not set(first_pids) & set(second_pids)


def test_idle_close_is_found_by_the_local_check_with_timed_round_trips_off(haproxy, configure_pool):
    """HEALTH_CHECK_DELAY=None: the readable socket alone leads to the (one) confirming ping."""
    configure_pool(MAX_CONNS=1, HEALTH_CHECK_DELAY=None)
    _hold_connections(1)
    _wait_until_haproxy_closed_the_idle_connections(1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    connection.close()
    stats = get_stats()
    assert stats["connections_lost"] == 1
    assert stats["checks_roundtrip"] == 1
    assert stats["requests_errors"] == 0


def test_max_idle_below_the_balancer_timeout_closes_connections_first(haproxy, configure_pool):
    # The documented setting: the pool closes idle connections before HAProxy
    # does, so none is ever found broken.
    configure_pool(MAX_CONNS=2, MAX_IDLE=IDLE_TIMEOUT * 0.5, HEALTH_CHECK_DELAY=None)
    _hold_connections(2)
    # Past MAX_IDLE, before HAProxy's timeout. Not timing-sensitive: the pool
    # tests MAX_IDLE before any liveness check (at checkout and in its sweeper),
    # so even a sleep that overruns HAProxy's timeout on a loaded machine finds
    # both connections expired, never lost.
    gevent.sleep(IDLE_TIMEOUT * 0.8)
    with Load(concurrency=2) as load:
        load.wait_for_requests(20)
    assert load.failures() == [], load.error_summary()
    stats = get_stats()
    assert stats["connections_expired"] >= 2
    assert stats["connections_lost"] == 0


def test_missing_binary_fails_with_the_command_to_run(monkeypatch):
    monkeypatch.setattr(proxies.shutil, "which", lambda name: None)
    monkeypatch.setattr(proxies.os, "access", lambda path, mode: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install haproxy"):
        proxies.require_binary("haproxy")


def test_haproxy_restart_under_load(haproxy, configure_pool):
    configure_pool(MAX_CONNS=4, POOL_TIMEOUT=15, CONNECT_RETRIES=2, CONNECT_RETRY_DELAY=0.05)
    with Load(concurrency=8) as load:
        load.wait_for_requests(100)
        before = len(load.outcomes)
        haproxy.stop()
        gevent.sleep(0.3)  # down for a while: requests fail, or wait in retries
        haproxy.start()
        back = monotonic()
        load.wait_for_requests(300, since=back)
    during = load.error_summary()
    logger.info("HAProxy restart: %d requests before, errors during the outage: %s", before, during)
    assert load.failures(since=back) == [], load.error_summary(since=back)
    assert len(load.started_after(back)) >= 300
    stats = get_stats()
    assert stats["pool_size"] <= 4
    assert stats["requests_waiting"] == 0
