"""A server restart under load: once the server is back, no request fails."""

from __future__ import annotations

import logging
from time import monotonic

import gevent
from django.db import connection
from gevent.event import Event

from django_db_geventpool import get_stats
from tests.testapp.models import Item

logger = logging.getLogger(__name__)

WORKERS = 8


def test_no_request_fails_once_the_server_accepts_connections_again(cluster, configure_pool):
    configure_pool(MAX_CONNS=4, POOL_TIMEOUT=10, CONNECT_RETRIES=1, CONNECT_RETRY_DELAY=0.05)
    outcomes: list[tuple[float, BaseException | None]] = []
    # Which server session served each successful request: (start, backend pid,
    # postmaster start time), the latter telling the old server from the new one.
    served_by: list[tuple[float, int, object]] = []
    stop = Event()

    def one_request() -> None:
        started = monotonic()
        try:
            Item.objects.filter(value__gte=0).count()
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid(), pg_postmaster_start_time()")
                pid, server_started = cursor.fetchone()
            served_by.append((started, pid, server_started))
            outcome = None
        except Exception as exc:
            outcome = exc
        finally:
            connection.close()
        outcomes.append((started, outcome))

    def worker() -> None:
        while not stop.is_set():
            one_request()
            gevent.sleep(0.002)

    workers = [gevent.spawn(worker) for _ in range(WORKERS)]
    try:
        gevent.sleep(0.3)
        before_restart = len(outcomes)
        stats_before = get_stats()
        restart = gevent.spawn(cluster.restart, "fast")
        restart.get(timeout=60)  # the cluster helper is gevent-patched: load keeps running
        back_at = monotonic()
        # Keep the load on until enough requests have started after the restart.
        with gevent.Timeout(30):
            while sum(started > back_at for started, _ in outcomes) < 200:
                gevent.sleep(0.05)
    finally:
        stop.set()
        gevent.joinall(workers, raise_error=True)

    after = [(s, o) for s, o in outcomes if s > back_at]
    failed_after = [o for _, o in after if o is not None]
    failed_during = [o for s, o in outcomes if s <= back_at and o is not None]
    logger.info(
        "restart: %d requests before, %d failed during the restart window, "
        "%d started after the server was back and %d of them failed; stats %s",
        before_restart, len(failed_during), len(after), len(failed_after), get_stats(),
    )
    assert before_restart > 0
    assert failed_after == []
    # Every connection of the old server was found broken and replaced.
    assert get_stats()["pool_size"] <= 4
    old_server = served_by[0][2]  # the first request ran before the restart
    old_pids = {pid for _, pid, server in served_by if server == old_server}
    assert old_pids
    served_after = [(pid, server) for started, pid, server in served_by if started > back_at]
    assert len(served_after) == len(after)
    assert all(server != old_server for _, server in served_after)
    assert not old_pids & {pid for pid, _ in served_after}
    stats = get_stats()
    # Each connection of the old server was found broken: at checkout (lost), or
    # given back broken by the request that was using it when the server stopped
    # (returns_bad; under this load almost every connection is in use).
    assert stats_before["pool_size"] >= 1
    assert stats["connections_lost"] + stats["returns_bad"] >= stats_before["pool_size"]
    # Replaced: new connections were opened on the restarted server.
    assert stats["connections_num"] - stats["connections_errors"] > stats_before["connections_num"]
