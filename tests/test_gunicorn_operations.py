"""Real gunicorn, 2 gevent workers: ``manage.py geventpool`` reaches every worker, and
prometheus-client's multiprocess mode sums every worker's pool metrics.

The workers run the repository's gunicorn.conf.py with ``GEVENTPOOL_CONTROL_DIR``
and ``PROMETHEUS_MULTIPROC_DIR`` set, as the docs tell users to.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from tests.support.eventually import wait_until
from tests.support.helpers import query, raw_connect
from tests.support.httpload import run_load
from tests.support.servers import EXAMPLE_DIR, example_env, migrate_example, start_gunicorn

EXAMPLE_DB = "geventpool_example"
APP_NAME = "geventpool-operations-test"
WORKERS = 2
MAX_CONNS = 3
REQUESTS = 300


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):
    """(gunicorn, port, env) with the control and multiprocess directories set."""
    migrate_example(cluster, EXAMPLE_DB)
    workdir = tmp_path_factory.mktemp("gunicorn-ops")
    (workdir / "prometheus").mkdir()
    env = example_env(
        cluster,
        EXAMPLE_DB,
        MAX_CONNS=str(MAX_CONNS),
        DB_APPLICATION_NAME=APP_NAME,
        GEVENTPOOL_CONTROL_DIR=str(workdir / "control"),
        PROMETHEUS_MULTIPROC_DIR=str(workdir / "prometheus"),
        GEVENTPOOL_METRICS_INTERVAL="1",
    )
    gunicorn, port = start_gunicorn(env, workdir / "gunicorn.log", workers=WORKERS)
    try:
        yield gunicorn, port, env
    finally:
        gunicorn.stop()
        gunicorn.kill_group()


def _manage(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "geventpool", *args],
        cwd=EXAMPLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _server_pids(observer) -> set[int]:
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    return {pid for (pid,) in query(observer, sql, [APP_NAME])}


def _load(port: int) -> set[int]:
    """REQUESTS requests at concurrency 20; the worker pids that served them."""
    load = run_load(port, "/products/summary", requests=REQUESTS, concurrency=20, keep_body=True)
    assert [r.error or r.status for r in load.failures] == []
    return {json.loads(r.body)["pid"] for r in load.results}


def _scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def test_drain_reaches_every_worker_and_new_connections_follow(served, cluster):
    gunicorn, port, env = served
    workers = _load(port)
    observer = raw_connect(EXAMPLE_DB)
    try:
        before = _server_pids(observer)
        assert before
        result = _manage(env, "drain")
        assert result.returncode == 0, result.stderr + gunicorn.log()[-3000:]
        lines = result.stdout.splitlines()
        assert len(lines) == WORKERS, result.stdout
        assert all("drained" in line for line in lines)
        answered = {int(line.split()[1].rstrip(":")) for line in lines}
        assert workers <= answered
        # Every idle connection of every worker was closed (no request is running).
        wait_until(lambda: not (_server_pids(observer) & before))
        _load(port)
        after = _server_pids(observer)
        assert after and not (after & before)
    finally:
        observer.close()
    assert gunicorn.process.poll() is None  # SIGUSR2 did not kill a worker
    assert "pool 'default' drained" in gunicorn.log()


def test_resize_and_stats_reach_every_worker(served):
    _gunicorn, port, env = served
    _load(port)
    result = _manage(env, "resize", "2")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == WORKERS
    stats = _manage(env, "stats")
    assert stats.returncode == 0, stats.stderr
    for line in stats.stdout.splitlines():
        pairs = dict(item.split("=", 1) for item in line.split()[3:])
        assert pairs["pool_max"] == "2", line
    assert _manage(env, "resize").returncode != 0  # a number is required


def _total(samples: dict, name: str) -> float:
    return sum(
        value
        for (sample, labels), value in samples.items()
        if sample == name and ("pool_name", "default") in labels
    )


def test_multiprocess_metrics_sum_every_worker(served):
    _gunicorn, port, env = served
    before = _scrape(port)
    # Both workers must serve, so that both pools exist. The kernel decides which
    # worker accepts: on a busy machine one may take a whole load, so load again.
    workers: set[int] = set()
    loads = 0
    while len(workers) < WORKERS and loads < 10:
        workers |= _load(port)
        loads += 1
    assert len(workers) == WORKERS, f"one worker served all {loads} loads"
    stats = _manage(env, "stats")
    assert stats.returncode == 0, stats.stderr
    per_worker = [
        dict(item.split("=", 1) for item in line.split()[3:]) for line in stats.stdout.splitlines()
    ]
    assert len(per_worker) == WORKERS
    expected_max = sum(int(s["pool_max"]) for s in per_worker)
    expected_open = sum(int(s["pool_size"]) for s in per_worker)

    # The gauges are copied every GEVENTPOOL_METRICS_INTERVAL (1 s) by each worker.
    wait_until(lambda: _total(_scrape(port), "db_client_connection_max") == expected_max)
    wait_until(lambda: _total(_scrape(port), "db_client_connection_count") == expected_open)
    after = _scrape(port)
    # The histograms are observed as the pools record: exactly one sample per request.
    wait = "db_client_connection_wait_time_seconds_count"
    assert _total(after, wait) - _total(before, wait) == REQUESTS * loads
    use = "db_client_connection_use_time_seconds_count"
    assert _total(after, use) - _total(before, use) == REQUESTS * loads
    assert _total(after, "db_client_connection_wait_time_seconds_bucket") > 0
