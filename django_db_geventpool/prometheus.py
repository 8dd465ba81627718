"""The pool's measures for Prometheus (``prometheus-client``, extra ``[prometheus]``).

One process (``runserver``, one celery worker, gunicorn with one worker): register
the collector, in one line (for example in ``settings.py`` or an ``AppConfig.ready``)::

    django_db_geventpool.prometheus.register()

and expose ``prometheus_client.REGISTRY`` as usual (``start_http_server`` or
`metrics_view`). Several gunicorn workers: each worker has its own pools, and a
scrape through gunicorn reaches one worker at random, so use prometheus-client's
multiprocess mode, which the collector cannot serve (custom collectors are not
supported there): set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory) for the
gunicorn master and workers, and ``gunicorn.conf.py`` starts `start_multiprocess_export`
in every worker and removes a dead worker's live gauges. Any worker then answers a
scrape of `metrics_view` with the sum over the live workers.

Metric names (label ``pool_name`` = the ``DATABASES`` alias), the OpenTelemetry
semantic conventions in Prometheus naming:

* ``db_client_connection_count{state="idle"|"used"}`` gauge
* ``db_client_connection_max``, ``db_client_connection_idle_max``,
  ``db_client_connection_idle_min``, ``db_client_connection_pending_requests`` gauges
* ``db_client_connection_timeouts_total`` counter
* ``db_client_connection_create_time_seconds``, ``db_client_connection_wait_time_seconds``,
  ``db_client_connection_use_time_seconds`` histograms, with the pool's own buckets
  (`histogram.BOUNDS`)
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from . import registry
from .histogram import BOUNDS
from .otel import pool_measure
from .pool import ConnectionPool

__all__ = [
    "PoolCollector",
    "metrics_view",
    "register",
    "start_multiprocess_export",
]

logger = logging.getLogger(__name__)

_PREFIX = "db_client_connection_"
# (metric suffix, measure read by pool_measure, help)
_GAUGES = (
    ("max", "pool_max", "The maximum number of open connections allowed"),
    ("idle_max", "reuse_size", "The maximum number of idle open connections allowed"),
    ("idle_min", "min_size", "The minimum number of idle open connections allowed"),
    (
        "pending_requests",
        "requests_waiting",
        "The number of current pending requests for an open connection",
    ),
)
_HISTOGRAMS = (
    ("create_time", "The time it took to create a new connection, seconds"),
    ("wait_time", "The time it took to obtain an open connection from the pool, seconds"),
    ("use_time", "The time between borrowing a connection and returning it, seconds"),
)
_COUNT_HELP = "The number of connections that are currently in state described by the state label"
_TIMEOUTS_HELP = "Checkouts that timed out waiting for a connection from the pool"


def _open_pools() -> list[ConnectionPool]:
    return registry.open_pools()


class PoolCollector(Collector):
    """Every open pool of this process, read at scrape time (nothing per checkout)."""

    def collect(self) -> Iterator[Any]:
        pools = _open_pools()
        count = GaugeMetricFamily(_PREFIX + "count", _COUNT_HELP, labels=["pool_name", "state"])
        gauges = {
            suffix: GaugeMetricFamily(_PREFIX + suffix, text, labels=["pool_name"])
            for suffix, _, text in _GAUGES
        }
        timeouts = CounterMetricFamily(_PREFIX + "timeouts", _TIMEOUTS_HELP, labels=["pool_name"])
        histograms = {
            name: HistogramMetricFamily(_PREFIX + name + "_seconds", text, labels=["pool_name"])
            for name, text in _HISTOGRAMS
        }
        for pool in pools:
            stats = pool.get_stats()
            idle = stats["pool_available"]
            count.add_metric([pool.name, "idle"], idle)
            count.add_metric([pool.name, "used"], stats["pool_size"] - idle)
            for suffix, key, _ in _GAUGES:
                gauges[suffix].add_metric([pool.name], pool_measure(pool, key))
            timeouts.add_metric([pool.name], stats["requests_timeouts"])
            for name, family in histograms.items():
                histogram = getattr(pool.timings, name)
                cumulative = histogram.cumulative()
                buckets = [(repr(bound), cumulative[i]) for i, bound in enumerate(BOUNDS)]
                buckets.append(("+Inf", cumulative[-1]))
                family.add_metric([pool.name], buckets, histogram.sum)
        yield count
        yield from gauges.values()
        yield timeouts
        yield from histograms.values()


# Registry -> its collector (weak: an id() could be reused by a later registry).
_registered: weakref.WeakKeyDictionary[CollectorRegistry, PoolCollector] = (
    weakref.WeakKeyDictionary()
)


def register(target: CollectorRegistry = REGISTRY) -> PoolCollector:
    """Register the pool collector in ``target`` (once; later calls return it)."""
    collector = _registered.get(target)
    if collector is None:
        collector = _registered[target] = PoolCollector()
        target.register(collector)
    return collector


# -- several processes: prometheus-client's multiprocess mode ------------------


class _Mirror:
    """This process's pools copied into ordinary prometheus-client metrics.

    In multiprocess mode those metrics live in files of ``PROMETHEUS_MULTIPROC_DIR``
    that every process can read; gauges are summed over live processes
    (``livesum``). Histogram samples are observed as the pool records them (a
    listener: about 1 µs per sample in multiprocess mode, only when enabled); the
    gauges and the timeout counter are copied every ``interval`` seconds.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        labels = ["pool_name"]
        self.count = Gauge(
            _PREFIX + "count", _COUNT_HELP, ["pool_name", "state"], multiprocess_mode="livesum"
        )
        self.gauges = {
            suffix: Gauge(_PREFIX + suffix, text, labels, multiprocess_mode="livesum")
            for suffix, _, text in _GAUGES
        }
        self.timeouts = Counter(_PREFIX + "timeouts", _TIMEOUTS_HELP, labels)
        self.histograms = {
            name: Histogram(_PREFIX + name + "_seconds", text, labels, buckets=BOUNDS)
            for name, text in _HISTOGRAMS
        }
        # Timeouts already exported, by pool (weak: a closed, dropped pool goes away).
        self._timeouts_seen: weakref.WeakKeyDictionary[ConnectionPool, int] = (
            weakref.WeakKeyDictionary()
        )

    def attach(self, pool: ConnectionPool) -> None:
        """Observe ``pool``'s samples from now on (called as the pool is created)."""
        for name, metric in self.histograms.items():
            getattr(pool.timings, name).listeners.append(metric.labels(pool.name).observe)
        self._timeouts_seen.setdefault(pool, 0)

    def sync(self) -> None:
        for pool in _open_pools():
            if pool not in self._timeouts_seen:
                self.attach(pool)  # created before the export started
            stats = pool.get_stats()
            idle = stats["pool_available"]
            self.count.labels(pool.name, "idle").set(idle)
            self.count.labels(pool.name, "used").set(stats["pool_size"] - idle)
            for suffix, key, _ in _GAUGES:
                self.gauges[suffix].labels(pool.name).set(pool_measure(pool, key))
            timeouts = stats["requests_timeouts"]
            if timeouts > self._timeouts_seen[pool]:
                self.timeouts.labels(pool.name).inc(timeouts - self._timeouts_seen[pool])
            self._timeouts_seen[pool] = timeouts

    def run_forever(self) -> None:
        import gevent

        pid = os.getpid()
        while os.getpid() == pid:
            try:
                self.sync()
            except Exception:
                logger.exception("copying the pool's metrics for Prometheus failed")
            gevent.sleep(self.interval)


_mirror: _Mirror | None = None


def start_multiprocess_export(interval: float = 5.0) -> None:
    """In a gunicorn worker: export this process's pools through multiprocess mode.

    Requires ``PROMETHEUS_MULTIPROC_DIR`` (set before prometheus-client is first
    imported). Copies the gauges every ``interval`` seconds in a greenlet; the pools
    created later (on first use) are picked up at the next copy.
    """
    global _mirror
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError("start_multiprocess_export() needs PROMETHEUS_MULTIPROC_DIR")
    if _mirror is not None:
        return
    import gevent

    _mirror = _Mirror(interval)
    registry.created_hooks.append(_mirror.attach)
    gevent.spawn(_mirror.run_forever)
    logger.info("exporting pool metrics for Prometheus (multiprocess mode), pid %d", os.getpid())


def metrics_view(request: Any) -> Any:
    """A Django view with the Prometheus exposition text (no permission check of its own).

    In multiprocess mode: every live worker's metrics, summed; else this
    process's ``REGISTRY`` (register the collector first).
    """
    from django.http import HttpResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        target = CollectorRegistry()
        multiprocess.MultiProcessCollector(target)
    else:
        target = REGISTRY
    response = HttpResponse(generate_latest(target), content_type=CONTENT_TYPE_LATEST)
    response["Cache-Control"] = "no-store"
    return response
