"""Real gunicorn, gevent workers, through the repository's gunicorn.conf.py, on the pool.

The example project is served by 2 workers with ``MAX_CONNS=5`` each; 2,000 HTTP
requests at concurrency 100 hit a view that queries the database, while a sampler
counts the server connections of the example in ``pg_stat_activity``.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.support.helpers import ServerConnectionSampler
from tests.support.httpload import run_load
from tests.support.servers import example_env, migrate_example, start_gunicorn

logger = logging.getLogger(__name__)

EXAMPLE_DB = "geventpool_example"
APP_NAME = "geventpool-gunicorn-test"
WORKERS = 2
MAX_CONNS = 5


@pytest.fixture(scope="module")
def example_db(cluster) -> int:
    """The example's database, migrated and seeded; returns how many products it has."""
    migrate_example(cluster, EXAMPLE_DB)
    cluster.psql(
        "INSERT INTO shop_product (name, price_cents, sold) "
        "SELECT 'p' || i, i * 100, 0 FROM generate_series(1, 50) i",
        dbname=EXAMPLE_DB,
    )
    # Other test modules share this database: count what is there now.
    return int(cluster.psql("SELECT count(*) FROM shop_product", dbname=EXAMPLE_DB))


@pytest.mark.parametrize("preload", [False, True], ids=["plain", "preload"])
def test_gunicorn_gevent_workers_stay_under_the_cap(cluster, example_db, tmp_path, preload):
    products = example_db
    # POOL_TIMEOUT: generous, as waiting is not what this test is about (100 clients
    # queue on 2 x 5 connections, on a machine that may be busy).
    env = example_env(
        cluster,
        EXAMPLE_DB,
        MAX_CONNS=str(MAX_CONNS),
        POOL_TIMEOUT="30",
        DB_APPLICATION_NAME=APP_NAME,
    )
    # With --preload the master imports the app and runs a query before forking.
    app = "tests.support.preload_wsgi" if preload else "project.wsgi"
    extra = ("--preload",) if preload else ()
    # The master's own idle connection (preload) is one more on the server.
    cap = WORKERS * MAX_CONNS + (1 if preload else 0)
    requests = 2000 if not preload else 600
    sampler = ServerConnectionSampler(APP_NAME, interval=0.01)
    try:
        gunicorn, port = start_gunicorn(
            env, tmp_path / "gunicorn.log", workers=WORKERS, app=app, extra_args=extra
        )
        try:
            sampler.start()
            load = run_load(
                port, "/products/summary", requests=requests, concurrency=100, keep_body=True
            )
            sampler.stop()
            stats_pids = {json.loads(r.body)["pid"] for r in load.results if r.ok}
            pool_stats = run_load(port, "/pool/stats", requests=10, concurrency=1, keep_body=True)
            returncode = gunicorn.stop()
        finally:
            gunicorn.kill_group()  # sampler.close() below stops the sampling if still on
        left = sampler.wait_for(0)
        peak = sampler.peak
    finally:
        sampler.close()
    log = gunicorn.log()
    logger.info(
        "gunicorn: %d requests, peak %d server connections (cap %d), workers seen %s",
        len(load.results),
        peak,
        cap,
        sorted(stats_pids),
    )

    assert [r.error or r.status for r in load.failures] == []
    assert len(load.results) == requests
    assert all(json.loads(r.body)["products"] == products for r in load.results)
    assert 0 < peak <= cap
    # The stats view of a worker, after the load: nothing waiting, nothing in use.
    assert pool_stats.failures == []
    for result in pool_stats.results:
        stats = json.loads(result.body)["databases"]["default"]
        assert stats["pool_max"] == MAX_CONNS
        assert stats["requests_waiting"] == 0
        assert stats["pool_available"] == stats["pool_size"] <= MAX_CONNS
        assert stats["requests_errors"] == 0
    assert returncode == 0, log[-3000:]
    assert left == 0, f"{left} connections left on the server after gunicorn stopped"
    # worker_exit closed the pool of every worker that served requests.
    closed = [line for line in log.splitlines() if "pool 'default' closed" in line]
    assert len(closed) >= len(stats_pids), log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_gunicorn_workers_warm_up_min_conns_before_any_request(cluster, example_db, tmp_path):
    """gunicorn.conf.py's post_worker_init creates each worker's pool: MIN_CONNS open at start."""
    app_name = "geventpool-gunicorn-warm"
    env = example_env(
        cluster, EXAMPLE_DB, MAX_CONNS=str(MAX_CONNS), MIN_CONNS="3", DB_APPLICATION_NAME=app_name
    )
    sampler = ServerConnectionSampler(app_name)
    try:
        gunicorn, _ = start_gunicorn(env, tmp_path / "gunicorn.log", workers=WORKERS)
        try:
            # No request is sent: only the warm-up can open these.
            warm = sampler.wait_for(WORKERS * 3, timeout=60)
            returncode = gunicorn.stop()
        finally:
            gunicorn.kill_group()
        left = sampler.wait_for(0)
    finally:
        sampler.close()
    log = gunicorn.log()
    assert warm == WORKERS * 3, log[-3000:]
    assert returncode == 0, log[-3000:]
    assert left == 0
    assert "warming up the pools failed" not in log, log[-3000:]


def test_transaction_mode_serves_more_requests_at_once_than_max_conns(
    cluster, example_db, tmp_path
):
    """One worker, MAX_CONNS=2, POOL_MODE=transaction: requests query, wait 50 ms, query.

    The connection goes back to the pool during each wait, so many more requests
    than MAX_CONNS are inside their wait at once (in session mode at most
    MAX_CONNS could be: each holds its connection until it ends), without a
    single error and with at most MAX_CONNS server connections.
    """
    max_conns = 2
    env = example_env(
        cluster,
        EXAMPLE_DB,
        MAX_CONNS=str(max_conns),
        POOL_TIMEOUT="30",
        POOL_MODE="transaction",
        DB_APPLICATION_NAME=APP_NAME,
    )
    sampler = ServerConnectionSampler(APP_NAME, interval=0.01)
    try:
        gunicorn, port = start_gunicorn(env, tmp_path / "gunicorn.log", workers=1)
        try:
            sampler.start()
            load = run_load(
                port,
                "/products/summary-with-wait?wait_ms=50",
                requests=400,
                concurrency=40,
                keep_body=True,
            )
            sampler.stop()
            pool_stats = run_load(port, "/pool/stats", requests=1, concurrency=1, keep_body=True)
            returncode = gunicorn.stop()
        finally:
            gunicorn.kill_group()
        left = sampler.wait_for(0)
        peak = sampler.peak
    finally:
        sampler.close()
    log = gunicorn.log()
    bodies = [json.loads(r.body) for r in load.results if r.ok]
    waiting_peak = max((body["waiting_peak"] for body in bodies), default=0)
    logger.info(
        "gunicorn transaction mode: %d requests, %d in their wait at once, peak %d "
        "server connections (MAX_CONNS %d)",
        len(load.results),
        waiting_peak,
        peak,
        max_conns,
    )

    assert [r.error or r.status for r in load.failures] == []
    assert len(bodies) == 400
    assert all(body["products"] == example_db for body in bodies)
    assert waiting_peak > max_conns
    assert 0 < peak <= max_conns
    stats = json.loads(pool_stats.results[0].body)["databases"]["default"]
    assert stats["requests_errors"] == 0
    assert stats["pool_available"] == stats["pool_size"] <= max_conns
    assert returncode == 0, log[-3000:]
    assert left == 0
    assert "Traceback" not in log, log[-3000:]
