"""A server restart under load: requests that start during the outage wait and succeed.

``pg_ctl restart -m fast`` under 50 greenlets on ``MAX_CONNS=10``: a request whose
query was in flight when the server stopped may fail (at most one per server
connection); every other request, those that start during the outage included,
waits for the server (``POOL_TIMEOUT`` is far longer than the outage) and
succeeds. The pool backs off while the server refuses connections: the connect
attempts made during the outage are few, whatever the number of waiting requests.
"""

from __future__ import annotations

import logging
import math
from time import monotonic

import gevent
from django.db import connection
from gevent.event import Event

from django_db_geventpool import PoolTimeout, get_stats
from django_db_geventpool import pool as pool_module
from tests.support.eventually import wait_until
from tests.testapp.models import Item

logger = logging.getLogger(__name__)

WORKERS = 50
MAX_CONNS = 10
RETRY_DELAY = 0.05
# pool.py's cap on the connect backoff (read from there, so that the bound below follows
# it); the jitter makes a round at least half of it.
MAX_BACKOFF = pool_module._MAX_BACKOFF


def test_requests_that_start_during_a_restart_wait_for_the_server(cluster, configure_pool):
    configure_pool(
        # Far longer than a restart takes, even on a loaded machine.
        MAX_CONNS=MAX_CONNS,
        POOL_TIMEOUT=60,
        CONNECT_RETRIES=1,
        CONNECT_RETRY_DELAY=RETRY_DELAY,
    )
    # (started, ended, error, failed at checkout) of each request.
    outcomes: list[tuple[float, float, BaseException | None, bool]] = []
    # Which server session served each successful request: (start, backend pid,
    # postmaster start time), the latter telling the old server from the new one.
    served_by: list[tuple[float, int, object]] = []
    stop = Event()

    def one_request() -> None:
        started = monotonic()
        error: BaseException | None = None
        at_checkout = False
        try:
            try:
                connection.ensure_connection()
            except Exception:
                at_checkout = True
                raise
            Item.objects.filter(value__gte=0).count()
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid(), pg_postmaster_start_time()")
                pid, server_started = cursor.fetchone()
            served_by.append((started, pid, server_started))
        except Exception as exc:
            error = exc
        finally:
            connection.close()
        outcomes.append((started, monotonic(), error, at_checkout))

    def worker() -> None:
        while not stop.is_set():
            one_request()
            gevent.sleep(0.002)

    workers = [gevent.spawn(worker) for _ in range(WORKERS)]
    try:
        # The load runs on the old server first (served_by[0] must come from it).
        wait_until(lambda: len(served_by) >= 50, timeout=60)
        before_restart = len(outcomes)
        stats_before = get_stats()
        restart_began = monotonic()
        restart = gevent.spawn(cluster.restart, "fast")
        restart.get(timeout=60)  # the cluster helper is gevent-patched: load keeps running
        back_at = monotonic()
        stats_back = get_stats()
        # Keep the load on until enough requests have started after the restart.
        with gevent.Timeout(60):
            while sum(started > back_at for started, *_ in outcomes) < 300:
                gevent.sleep(0.05)
    finally:
        stop.set()
        gevent.joinall(workers, raise_error=True)

    outage = back_at - restart_began
    failed = [(s, e, checkout) for s, _, e, checkout in outcomes if e is not None]
    during = [o for o in outcomes if restart_began <= o[0] <= back_at]
    # Requests that were running or waiting at some moment of the outage.
    across = [o for o in outcomes if o[0] <= back_at and o[1] >= restart_began]
    connect_errors = stats_back["connections_errors"] - stats_before["connections_errors"]
    connect_attempts = stats_back["connections_num"] - stats_before["connections_num"]
    logger.info(
        "restart (%.2fs outage): %d requests before, %d started during the outage, "
        "%d ran across it, %d failed (%s); connect attempts during the outage %d (%d failed); "
        "stats %s",
        outage,
        before_restart,
        len(during),
        len(across),
        len(failed),
        sorted({f"{type(e).__name__}: {str(e).splitlines()[0]}" for _, e, _ in failed}),
        connect_attempts,
        connect_errors,
        get_stats(),
    )
    assert before_restart > 0
    assert during and len(across) >= WORKERS
    # No checkout failed: requests waited through the outage.
    assert [e for _, e, checkout in failed if checkout] == []
    assert not any(isinstance(e, PoolTimeout) for _, e, _ in failed)
    # Only requests whose query was in flight on a connection of the old server
    # failed: at most one per server connection, none started after it was back.
    assert len(failed) <= MAX_CONNS
    assert all(started <= back_at for started, _, _ in failed)
    # Backoff: few connect attempts, not one (or two) per waiting request. A burst
    # of up to MAX_CONNS connects (one per lost connection) may fail before the
    # first failure is known, and another if a connect succeeds meanwhile; after
    # that one probe per backoff round, the delay doubling from RETRY_DELAY up to
    # MAX_BACKOFF (so a long outage, on a loaded machine, adds a probe a second).
    doublings = math.ceil(math.log2(1 + outage / (RETRY_DELAY * 0.5)))
    rounds_to_the_cap = math.ceil(math.log2(MAX_BACKOFF / RETRY_DELAY))
    probes = min(doublings, rounds_to_the_cap) + math.ceil(outage / (MAX_BACKOFF * 0.5))
    assert connect_errors <= 2 * MAX_CONNS + 2 * probes + 2, (connect_errors, outage)
    assert connect_errors < len(across), (connect_errors, len(across))

    # Every connection of the old server was found broken and replaced.
    assert get_stats()["pool_size"] <= MAX_CONNS
    old_server = served_by[0][2]  # the first request ran before the restart
    old_pids = {pid for _, pid, server in served_by if server == old_server}
    assert old_pids
    served_after = [(pid, server) for started, pid, server in served_by if started > back_at]
    assert len(served_after) == sum(started > back_at for started, *_ in outcomes)
    assert all(server != old_server for _, server in served_after)
    assert not old_pids & {pid for pid, _ in served_after}
    stats = get_stats()
    assert stats_before["pool_size"] >= 1
    assert stats["connections_lost"] + stats["returns_bad"] >= 1
    assert stats["connections_num"] - stats["connections_errors"] > stats_before["connections_num"]
