"""Duration histograms with fixed, log-spaced buckets, cheap enough to stay on always.

A `Histogram` counts durations (float seconds) into the buckets of `BOUNDS`, a
1-2-5 series from 10 µs to 100 s plus an overflow bucket. Recording is a binary
search in a tuple of 22 floats and two additions (about 0.2 µs): the pool records
every checkout's wait and use time and every connect's duration (see `PoolTimings`).
Nothing is kept per sample, so memory is constant whatever the traffic.

The buckets are the same for every histogram and every process, so exporters can
pass them on as they are (Prometheus ``le`` bounds, OpenTelemetry explicit bucket
boundaries) and readings from several processes can be added bucket by bucket.

Listeners (``Histogram.listeners``) are called with each recorded value; the list is
empty unless an exporter that needs every sample (OpenTelemetry) is attached, and
an empty list costs one truth test.

Pure Python, no dependencies: no Django, no gevent, no driver.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

__all__ = ["BOUNDS", "Histogram", "PoolTimings"]

#: Upper bounds (inclusive, seconds) of the buckets; a last bucket counts the rest.
BOUNDS: tuple[float, ...] = (
    *tuple(mantissa * 10.0**exponent for exponent in range(-5, 2) for mantissa in (1, 2, 5)),
    100.0,
)


class Histogram:
    """Counts of durations by bucket, their sum, and optional per-sample listeners."""

    __slots__ = ("counts", "sum", "listeners")

    def __init__(self) -> None:
        #: ``counts[i]``: samples in ``(BOUNDS[i-1], BOUNDS[i]]``; the last one: above BOUNDS[-1].
        self.counts: list[int] = [0] * (len(BOUNDS) + 1)
        #: Sum of every sample, seconds.
        self.sum = 0.0
        #: Called with every sample after it is counted (exporters; empty by default).
        self.listeners: list[Callable[[float], None]] = []

    def record(self, seconds: float) -> None:
        """Count one duration (seconds)."""
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds
        if self.listeners:
            for listener in self.listeners:
                listener(seconds)

    @property
    def count(self) -> int:
        """How many samples were recorded."""
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """Samples at or below each bound of `BOUNDS`, then the total (Prometheus ``le``)."""
        running, result = 0, []
        for count in self.counts:
            running += count
            result.append(running)
        return result

    def quantile(self, q: float) -> float:
        """Estimated ``q`` quantile (0..1) in seconds; 0.0 without samples.

        Interpolated linearly inside the bucket that holds it (as Prometheus's
        ``histogram_quantile`` does), so it is exact to the bucket's width: within
        a factor of 2.5 of the truth at worst. Above the last bound: that bound.
        """
        total = self.count
        if total == 0:
            return 0.0
        rank = q * total
        running = 0
        for index, count in enumerate(self.counts):
            if count and running + count >= rank:
                if index == len(BOUNDS):
                    return BOUNDS[-1]
                lower = BOUNDS[index - 1] if index else 0.0
                return lower + (BOUNDS[index] - lower) * max(rank - running, 0.0) / count
            running += count
        return BOUNDS[-1]

    def snapshot(self) -> dict[str, object]:
        """A copy for export: ``bounds``, ``counts`` (per bucket), ``sum`` and ``count``."""
        counts = list(self.counts)
        return {"bounds": list(BOUNDS), "counts": counts, "sum": self.sum, "count": sum(counts)}


class PoolTimings:
    """The three histograms of a pool, named as in OpenTelemetry's conventions.

    * ``wait_time``: checkout called to connection handed out (queueing, health
      check and, when one was needed, the connect), every checkout that succeeded;
    * ``use_time``: connection handed out to given back (or discarded);
    * ``create_time``: one successful connect to the server.
    """

    __slots__ = ("wait_time", "use_time", "create_time")

    def __init__(self) -> None:
        self.wait_time = Histogram()
        self.use_time = Histogram()
        self.create_time = Histogram()

    def stats(self) -> dict[str, int]:
        """Derived keys for ``get_stats()``: p50/p99 of the wait and use times, ms (rounded)."""
        wait, use = self.wait_time, self.use_time
        return {
            "requests_wait_p50_ms": round(wait.quantile(0.50) * 1000),
            "requests_wait_p99_ms": round(wait.quantile(0.99) * 1000),
            "requests_use_p50_ms": round(use.quantile(0.50) * 1000),
            "requests_use_p99_ms": round(use.quantile(0.99) * 1000),
        }
