"""A real celery worker (``--pool gevent --concurrency 100``) on the pool, with a real Redis.

The example project's tasks use the ORM and never give their connection back by
hand: ``django_db_geventpool.celery.install()`` (in ``example/project/celery.py``)
does it at ``task_postrun``. Celery's own Django fixup is told to keep connections
(``CELERY_DB_REUSE_MAX``), so the integration is the only thing giving them back.
"""

from __future__ import annotations

import gc
import logging

import pytest
from celery import Celery
from celery.result import ResultSet

from tests.support.eventually import wait_until
from tests.support.helpers import ServerConnectionSampler
from tests.support.servers import example_env, migrate_example, start_celery_worker, start_redis

logger = logging.getLogger(__name__)

EXAMPLE_DB = "geventpool_example"
APP_NAME = "geventpool-celery-test"
MAX_CONNS = 5
TASKS = 1000
# How long the asyncio tasks' loop runs: ample for 50 sells on a busy machine.
LOOP_SECONDS = 8.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    redis, port = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        redis.stop()
        redis.kill_group()


@pytest.fixture(scope="module")
def product_id(cluster):
    migrate_example(cluster, EXAMPLE_DB)
    return int(
        cluster.psql(
            "INSERT INTO shop_product (name, price_cents, sold) "
            "VALUES ('celery', 100, 0) RETURNING id",
            dbname=EXAMPLE_DB,
        ).splitlines()[0]
    )


@pytest.fixture(scope="module")
def worker(cluster, redis_url, product_id, tmp_path_factory):
    env = example_env(
        cluster,
        EXAMPLE_DB,
        MAX_CONNS=str(MAX_CONNS),
        DB_APPLICATION_NAME=APP_NAME,
        CELERY_BROKER_URL=redis_url,
        CELERY_DB_REUSE_MAX="1000000",
    )
    proc = start_celery_worker(
        env, tmp_path_factory.mktemp("celery") / "worker.log", concurrency=100
    )
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill_group()


@pytest.fixture(scope="module")
def client(redis_url, worker):
    app = Celery(
        "geventpool-test-client", broker=redis_url, backend=redis_url, set_as_current=False
    )
    app.conf.broker_connection_retry_on_startup = True
    yield app
    _collect_results_while_redis_runs()
    # Under gevent the result backend drains Redis from a greenlet of its own that
    # outlives the app; stop it, or it keeps reconnecting to the stopped Redis
    # while the rest of the suite runs.
    drainer = getattr(app.backend.result_consumer, "drainer", None)
    drain_greenlet = getattr(drainer, "_g", None)
    if drain_greenlet is not None:
        drain_greenlet.kill(timeout=5)
    app.close()


def _collect_results_while_redis_runs() -> None:
    """Collect the AsyncResults left in reference cycles now, while Redis still runs.

    An AsyncResult unsubscribes from Redis when it is collected: collected by chance
    in a later test, after Redis stopped, it fails there (an unraisable exception
    in whatever test happens to run).
    """
    gc.collect()


def _run_all(client, calls, timeout=120):
    """Send ``(task name, args)`` calls; return their results (exceptions as values)."""
    results = [client.send_task(name, args=args) for name, args in calls]
    return ResultSet(results, app=client).join(timeout=timeout, propagate=False)


def test_thousand_orm_tasks_stay_under_the_cap_and_give_back(client, worker, product_id):
    with ServerConnectionSampler(APP_NAME, interval=0.01) as sampler:
        values = _run_all(client, [("shop.tasks.sell", (product_id,))] * TASKS)
    stats = _run_all(client, [("shop.tasks.pool_stats", ())])[0]
    logger.info(
        "celery: %d tasks, peak %d server connections, worker stats %s",
        len(values),
        sampler.peak,
        stats,
    )

    failures = [v for v in values if isinstance(v, BaseException)]
    assert failures == []
    assert sorted(values) == list(range(1, TASKS + 1))
    assert 0 < sampler.peak <= MAX_CONNS
    # None left checked out, and none had to be reclaimed from an ended greenlet:
    # task_postrun gave every connection back.
    assert stats["pool_size"] - stats["pool_available"] == 0
    assert stats["requests_waiting"] == 0
    assert stats["connections_reclaimed"] == 0
    assert stats["requests_num"] >= TASKS
    assert stats["requests_errors"] == 0
    assert "SynchronousOnlyOperation" not in worker.log()


def test_failed_and_retried_tasks_give_their_connections_back(client, product_id):
    """docs/celery.md: task_postrun gives the connection back on failure and on retry too."""
    before = _run_all(client, [("shop.tasks.pool_stats", ())])[0]
    calls = [("shop.tasks.fail_after_query", (product_id,))] * 20
    calls += [("shop.tasks.retry_once_after_query", (product_id,))] * 20
    values = _run_all(client, calls)
    assert [type(v).__name__ for v in values[:20]] == ["ValueError"] * 20
    assert values[20:] == [1] * 20  # each retried once, then succeeded
    stats = _run_all(client, [("shop.tasks.pool_stats", ())])[0]
    assert stats["pid"] == before["pid"]
    # 20 + 40 checkouts, every one given back at task_postrun, none reclaimed later.
    assert stats["requests_num"] - before["requests_num"] >= 60
    assert stats["pool_size"] - stats["pool_available"] == 0
    assert stats["connections_reclaimed"] == before["connections_reclaimed"]
    assert stats["requests_errors"] == before["requests_errors"]


def _sells_while_the_loop_runs(client, task_name, product_id, count=50):
    """Start ``task_name``'s asyncio loop; once it runs, ``count`` sells; their results.

    Fails unless every sell ended while the loop was still running: the overlap is
    what both asyncio tests are about.
    """
    loop_task = client.send_task(task_name, args=(LOOP_SECONDS,))
    wait_until(lambda: loop_task.state == "LOOP_RUNNING", timeout=60, interval=0.05)
    values = _run_all(client, [("shop.tasks.sell", (product_id,))] * count)
    assert loop_task.state == "LOOP_RUNNING", "the sells did not all end inside the loop"
    loop_task.get(timeout=LOOP_SECONDS + 60)
    return values


def test_asyncio_loop_in_a_greenlet_is_what_raises_synchronous_only(client, product_id):
    """The cause of SynchronousOnlyOperation under --pool gevent: a loop in a sibling greenlet."""
    values = _sells_while_the_loop_runs(client, "shop.tasks.sleep_in_asyncio", product_id)
    assert {type(v).__name__ for v in values} == {"SynchronousOnlyOperation"}


def test_asyncio_in_a_native_thread_leaves_the_orm_alone(client, product_id):
    values = _sells_while_the_loop_runs(
        client, "shop.tasks.sleep_in_asyncio_native_thread", product_id
    )
    assert [v for v in values if isinstance(v, BaseException)] == []
    assert all(isinstance(v, int) for v in values)


def test_transaction_mode_runs_more_tasks_at_once_than_max_conns(
    cluster, redis_url, product_id, tmp_path
):
    """A worker with MAX_CONNS=2 and POOL_MODE=transaction: tasks query, wait, query.

    Many more tasks than MAX_CONNS are inside their wait at once (in session mode
    each would hold its connection until task_postrun), with no error and at most
    MAX_CONNS server connections. Its own Redis database keeps it apart from the
    module's worker.
    """
    max_conns = 2
    broker = redis_url.rsplit("/", 1)[0] + "/1"
    env = example_env(
        cluster,
        EXAMPLE_DB,
        MAX_CONNS=str(max_conns),
        POOL_TIMEOUT="30",
        POOL_MODE="transaction",
        DB_APPLICATION_NAME=APP_NAME + "-tx",
        CELERY_BROKER_URL=broker,
        CELERY_DB_REUSE_MAX="1000000",
    )
    proc = start_celery_worker(env, tmp_path / "worker.log", concurrency=40)
    app = Celery("geventpool-test-client-tx", broker=broker, backend=broker, set_as_current=False)
    app.conf.broker_connection_retry_on_startup = True
    try:
        with ServerConnectionSampler(APP_NAME + "-tx", interval=0.01) as sampler:
            values = _run_all(app, [("shop.tasks.count_with_wait", (0.05,))] * 200)
        stats = _run_all(app, [("shop.tasks.pool_stats", ())])[0]
    finally:
        _collect_results_while_redis_runs()
        drainer = getattr(app.backend.result_consumer, "drainer", None)
        drain_greenlet = getattr(drainer, "_g", None)
        if drain_greenlet is not None:
            drain_greenlet.kill(timeout=5)
        app.close()
        proc.stop()
        proc.kill_group()
    failures = [v for v in values if isinstance(v, BaseException)]
    waiting_peak = max((v["waiting_peak"] for v in values if isinstance(v, dict)), default=0)
    logger.info(
        "celery transaction mode: %d tasks, %d in their wait at once, peak %d server connections",
        len(values),
        waiting_peak,
        sampler.peak,
    )

    assert failures == []
    assert all(v["products"] == v["again"] >= 1 for v in values)
    assert waiting_peak > max_conns
    assert 0 < sampler.peak <= max_conns
    assert stats["requests_errors"] == 0
    assert stats["pool_size"] - stats["pool_available"] == 0
    assert "Traceback" not in proc.log()
