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
    stop = Event()

    def one_request() -> None:
        started = monotonic()
        try:
            Item.objects.filter(value__gte=0).count()
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
