"""The pool's OpenTelemetry metrics, reported when ``opentelemetry-api`` is installed.

Every pool the backend creates is attached (`attach`) when the package
``opentelemetry`` can be imported (extra ``django-db-geventpool[otel]``); without it
nothing of OpenTelemetry is imported or registered. The instruments come from
the global ``MeterProvider`` (meter ``django_db_geventpool``), so the application's
own OpenTelemetry set-up decides where they go; until it installs a provider, the
API's no-op provider drops them.

Names, kinds and units of the semantic conventions for database client connection
pools; every point has ``db.client.connection.pool.name`` = the ``DATABASES`` alias:

================================================  =====================  ==============
``db.client.connection.count``                    UpDownCounter (obs.)   {connection}, by
                                                                          ``...state`` idle/used
``db.client.connection.max``                      UpDownCounter (obs.)   {connection}
``db.client.connection.idle.max``                 UpDownCounter (obs.)   {connection}
``db.client.connection.idle.min``                 UpDownCounter (obs.)   {connection}
``db.client.connection.pending_requests``         UpDownCounter (obs.)   {request}
``db.client.connection.timeouts``                 Counter (obs.)         {timeout}
``db.client.connection.create_time``              Histogram              s
``db.client.connection.wait_time``                Histogram              s
``db.client.connection.use_time``                 Histogram              s
================================================  =====================  ==============

The counts are observed: read from the pool when the SDK collects, nothing done per
checkout. The histograms are recorded as they happen (the API has no observable
histogram): each attached pool's `Histogram` gets a listener, the only cost OTel
adds to a checkout (the SDK's ``record``, two per checkout).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from typing import Any

from .histogram import BOUNDS
from .pool import ConnectionPool

__all__ = ["attach", "available"]

logger = logging.getLogger(__name__)

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

# The attached pools; callbacks skip closed ones. Weak: a pool closed and dropped
# (Django's test-database set-up, close_pool()) stops being reported.
_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
# The process's instruments, created on first attach (one set for every pool).
_histograms: dict[str, Any] | None = None


def available() -> bool:
    """True if ``opentelemetry-api`` can be imported."""
    try:
        import opentelemetry.metrics  # noqa: F401
    except ImportError:
        return False
    return True


def attach(pool: ConnectionPool) -> bool:
    """Report ``pool``'s metrics through OpenTelemetry; False if the API is not installed."""
    if not available():
        return False
    histograms = _instruments()
    attributes = {POOL_NAME: pool.name}
    for name, histogram in histograms.items():
        getattr(pool.timings, name).listeners.append(_Recorder(histogram, attributes))
    _pools.add(pool)
    return True


class _Recorder:
    """Records one pool's samples into an OpenTelemetry histogram (a listener)."""

    __slots__ = ("record", "attributes")

    def __init__(self, histogram: Any, attributes: dict[str, str]) -> None:
        self.record = histogram.record
        self.attributes = attributes

    def __call__(self, seconds: float) -> None:
        self.record(seconds, self.attributes)


def _instruments() -> dict[str, Any]:
    global _histograms
    if _histograms is not None:
        return _histograms
    from opentelemetry import metrics

    from . import __version__

    meter = metrics.get_meter("django_db_geventpool", __version__)
    meter.create_observable_up_down_counter(
        "db.client.connection.count",
        [_observe_count],
        unit="{connection}",
        description="The number of connections that are currently in state described by "
        "the state attribute",
    )
    for name, key, unit, description in _GAUGES:
        meter.create_observable_up_down_counter(
            name, [_observer(key)], unit=unit, description=description
        )
    meter.create_observable_counter(
        "db.client.connection.timeouts",
        [_observer("requests_timeouts")],
        unit="{timeout}",
        description="The number of connection timeouts that have occurred trying to obtain "
        "a connection from the pool",
    )
    histograms = {}
    for attribute, description in _HISTOGRAMS:
        kwargs: dict[str, Any] = {"unit": "s", "description": description}
        try:
            # Our buckets, so that OTel's agree with get_stats() and Prometheus
            # (the advisory argument exists since opentelemetry-api 1.23).
            histograms[attribute] = meter.create_histogram(
                f"db.client.connection.{attribute}",
                explicit_bucket_boundaries_advisory=list(BOUNDS),
                **kwargs,
            )
        except TypeError:
            histograms[attribute] = meter.create_histogram(
                f"db.client.connection.{attribute}", **kwargs
            )
    _histograms = histograms
    logger.debug("OpenTelemetry instruments created")
    return histograms


_GAUGES = (
    (
        "db.client.connection.max",
        "pool_max",
        "{connection}",
        "The maximum number of open connections allowed",
    ),
    (
        "db.client.connection.idle.max",
        "reuse_size",
        "{connection}",
        "The maximum number of idle open connections allowed",
    ),
    (
        "db.client.connection.idle.min",
        "min_size",
        "{connection}",
        "The minimum number of idle open connections allowed",
    ),
    (
        "db.client.connection.pending_requests",
        "requests_waiting",
        "{request}",
        "The number of current pending requests for an open connection",
    ),
)

_HISTOGRAMS = (
    ("create_time", "The time it took to create a new connection"),
    ("wait_time", "The time it took to obtain an open connection from the pool"),
    ("use_time", "The time between borrowing a connection and returning it to the pool"),
)


def _open_pools() -> list[ConnectionPool]:
    return [pool for pool in list(_pools) if not pool.closed]


def pool_measure(pool: ConnectionPool, key: str) -> int:
    """A get_stats() key, or the pool's ``reuse_size`` / ``min_size`` (0 if it has none)."""
    if key in ("reuse_size", "min_size"):
        return int(getattr(pool, key, 0))
    return pool.get_stats()[key]


def _observer(key: str) -> Any:
    def observe(options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        return [
            Observation(pool_measure(pool, key), {POOL_NAME: pool.name}) for pool in _open_pools()
        ]

    return observe


def _observe_count(options: Any) -> Iterable[Any]:
    from opentelemetry.metrics import Observation

    observations = []
    for pool in _open_pools():
        stats = pool.get_stats()
        idle = stats["pool_available"]
        observations.append(Observation(idle, {POOL_NAME: pool.name, STATE: "idle"}))
        observations.append(
            Observation(stats["pool_size"] - idle, {POOL_NAME: pool.name, STATE: "used"})
        )
    return observations
