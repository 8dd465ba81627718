"""The pool's time histograms, through the real OpenTelemetry SDK and prometheus-client.

One known workload on the real PostgreSQL of the suite (``MAX_CONNS=1``): 5 quick
requests, then a holder keeps the connection while one more checkout times out,
then gives it back. So: 6 successful checkouts (wait and use time), 1 connect, 1
timeout, and while the holder holds: 1 used, 0 idle.
"""

from __future__ import annotations

import sys
from typing import Any

import gevent
import pytest
from django.db import connection
from gevent.event import Event

from django_db_geventpool import PoolTimeout, get_stats, otel, prometheus
from django_db_geventpool.histogram import BOUNDS
from django_db_geventpool.pool import ConnectionPool
from tests.support.eventually import wait_until
from tests.support.helpers import backend_pid, checkout_timeout, request_pid

CHECKOUTS = 6


def _workload(while_held) -> None:
    """The workload of the module docstring; ``while_held()`` runs while the holder holds."""
    for _ in range(CHECKOUTS - 1):
        request_pid()
    release, held = Event(), Event()

    def hold() -> None:
        try:
            backend_pid()
            held.set()
            release.wait()
        finally:
            connection.close()

    holder = gevent.spawn(hold)
    assert held.wait(timeout=30)
    # The pool's connect happened above under a generous POOL_TIMEOUT: only this
    # checkout, which must time out, waits briefly.
    with checkout_timeout(0.2), pytest.raises(PoolTimeout):
        request_pid()
    while_held()
    release.set()
    holder.get(timeout=30)


# -- OpenTelemetry --------------------------------------------------------------------


@pytest.fixture(scope="module")
def otel_reader():
    """The process's global MeterProvider (it can be set once), read in memory."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


def _otel_points(reader) -> dict[str, list[Any]]:
    """Data points of the pool named "default", by metric name (cumulative)."""
    points: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    if data is None:  # no instrument yet: no pool was created in this process
        return points
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            if scope.scope.name != "django_db_geventpool":
                continue
            for metric in scope.metrics:
                points[metric.name] = [
                    p
                    for p in metric.data.data_points
                    if p.attributes.get("db.client.connection.pool.name") == "default"
                ]
    return points


def _histogram_count(points, name: str) -> int:
    return sum(p.count for p in points.get(name, []))


def _value(points, name: str, **attributes: str) -> int:
    matching = [
        p.value
        for p in points[name]
        if all(p.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(matching) == 1, (name, attributes, points[name])
    return matching[0]


def test_opentelemetry_reports_the_semantic_convention_metrics(configure_pool, otel_reader):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=30, REUSE_CONNS=1)
    before = _otel_points(otel_reader)
    timeouts_before = sum(p.value for p in before.get("db.client.connection.timeouts", []))
    counts_before = {
        name: _histogram_count(before, name)
        for name in (
            "db.client.connection.wait_time",
            "db.client.connection.use_time",
            "db.client.connection.create_time",
        )
    }
    seen_while_held: dict[str, Any] = {}
    _workload(lambda: seen_while_held.update(_otel_points(otel_reader)))

    after = _otel_points(otel_reader)
    assert (
        _histogram_count(after, "db.client.connection.wait_time")
        - counts_before["db.client.connection.wait_time"]
        == CHECKOUTS
    )
    assert (
        _histogram_count(after, "db.client.connection.use_time")
        - counts_before["db.client.connection.use_time"]
        == CHECKOUTS
    )
    assert (
        _histogram_count(after, "db.client.connection.create_time")
        - counts_before["db.client.connection.create_time"]
        == 1
    )
    assert sum(p.value for p in after["db.client.connection.timeouts"]) - timeouts_before == 1
    # Our own buckets, so that OTel, Prometheus and get_stats() agree.
    (wait_point,) = after["db.client.connection.wait_time"]
    assert tuple(wait_point.explicit_bounds) == BOUNDS
    held = seen_while_held
    assert _value(held, "db.client.connection.count", **{"db.client.connection.state": "used"}) == 1
    assert _value(held, "db.client.connection.count", **{"db.client.connection.state": "idle"}) == 0
    assert (
        _value(after, "db.client.connection.count", **{"db.client.connection.state": "used"}) == 0
    )
    assert (
        _value(after, "db.client.connection.count", **{"db.client.connection.state": "idle"}) == 1
    )
    assert _value(after, "db.client.connection.max") == 1
    assert _value(after, "db.client.connection.idle.max") == 1
    assert _value(after, "db.client.connection.idle.min") == 0
    assert _value(after, "db.client.connection.pending_requests") == 0


def test_pending_requests_counts_queued_checkouts(configure_pool, otel_reader):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=30)
    seen: dict[str, Any] = {}
    waiters: list[gevent.Greenlet] = []

    def queued_checkout_then_read() -> None:
        # It waits with the generous POOL_TIMEOUT: served once the holder lets go.
        waiters.append(gevent.spawn(request_pid))
        wait_until(lambda: get_stats()["requests_waiting"] == 1)
        seen.update(_otel_points(otel_reader))

    _workload(queued_checkout_then_read)
    assert waiters[0].get(timeout=30) > 0
    assert _value(seen, "db.client.connection.pending_requests") == 1


def test_nothing_is_attached_without_opentelemetry(monkeypatch):
    from tests.unit.test_pool_unit import FakeDriver

    # As if opentelemetry-api were not installed: its import fails.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.metrics", None)
    pool = ConnectionPool("no-otel", FakeDriver())
    try:
        assert otel.attach(pool) is False
        assert [
            h.listeners
            for h in (pool.timings.wait_time, pool.timings.use_time, pool.timings.create_time)
        ] == [[], [], []]
    finally:
        pool.close()


# -- Prometheus -----------------------------------------------------------------------


def _scrape() -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    target = CollectorRegistry()
    prometheus.register(target)
    text = generate_latest(target).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _sample(families, family: str, sample: str, **labels: str) -> float:
    matching = [
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matching) == 1, (family, sample, labels)
    return matching[0]


def test_prometheus_exposition_has_the_same_measures(configure_pool):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=30)
    held: dict[str, Any] = {}
    _workload(lambda: held.update(_scrape()))
    families = _scrape()

    wait = "db_client_connection_wait_time_seconds"
    assert families[wait].type == "histogram"
    assert _sample(families, wait, wait + "_count", pool_name="default") == CHECKOUTS
    assert _sample(families, wait, wait + "_bucket", pool_name="default", le="+Inf") == CHECKOUTS
    les = [s.labels["le"] for s in families[wait].samples if s.name == wait + "_bucket"]
    assert [float(le) for le in les[:-1]] == list(BOUNDS)
    use = "db_client_connection_use_time_seconds"
    assert _sample(families, use, use + "_count", pool_name="default") == CHECKOUTS
    # The holder kept its connection through the 0.2 s timeout: one use above 0.1 s.
    assert _sample(families, use, use + "_bucket", pool_name="default", le="0.1") <= CHECKOUTS - 1
    assert _sample(families, use, use + "_sum", pool_name="default") >= 0.2
    create = "db_client_connection_create_time_seconds"
    assert _sample(families, create, create + "_count", pool_name="default") == 1
    timeouts = "db_client_connection_timeouts"
    assert families[timeouts].type == "counter"
    assert _sample(families, timeouts, timeouts + "_total", pool_name="default") == 1
    count = "db_client_connection_count"
    assert _sample(held, count, count, pool_name="default", state="used") == 1
    assert _sample(held, count, count, pool_name="default", state="idle") == 0
    assert _sample(families, count, count, pool_name="default", state="used") == 0
    assert _sample(families, count, count, pool_name="default", state="idle") == 1
    assert (
        _sample(
            families, "db_client_connection_max", "db_client_connection_max", pool_name="default"
        )
        == 1
    )
    # And get_stats() reads the same histograms.
    stats = get_stats()
    assert stats["requests_timeouts"] == 1
    assert 0 <= stats["requests_wait_p50_ms"] <= stats["requests_wait_p99_ms"]
    assert stats["requests_use_p99_ms"] >= 100
