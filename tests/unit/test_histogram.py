"""The pool's duration histograms (histogram.py): pure logic, no server."""

from __future__ import annotations

import pytest

from django_db_geventpool.histogram import BOUNDS, Histogram, PoolTimings


def test_bounds_are_a_fixed_1_2_5_series_from_10_us_to_100_s():
    assert BOUNDS[0] == pytest.approx(1e-5) and BOUNDS[-1] == 100.0
    assert len(BOUNDS) == 22
    assert list(BOUNDS) == sorted(BOUNDS)


def test_a_sample_lands_in_the_bucket_whose_bound_is_the_first_at_or_above_it():
    histogram = Histogram()
    for seconds in (0.0, 1e-5, 1.5e-5, 0.02, 0.0200001, 1000.0):
        histogram.record(seconds)
    counts = histogram.counts
    assert counts[0] == 2  # 0 and exactly 10 µs: "le" is inclusive
    assert counts[BOUNDS.index(2e-5)] == 1
    assert counts[BOUNDS.index(0.02)] == 1
    assert counts[BOUNDS.index(0.05)] == 1
    assert counts[-1] == 1  # above 100 s: the overflow bucket
    assert histogram.count == 6
    assert histogram.sum == pytest.approx(1000.0400251)
    assert histogram.cumulative()[-1] == 6
    assert histogram.cumulative()[BOUNDS.index(0.02)] == 4


def test_quantiles_are_exact_to_the_bucket():
    histogram = Histogram()
    for _ in range(98):
        histogram.record(0.003)  # bucket (0.002, 0.005]
    histogram.record(0.3)  # (0.2, 0.5]
    histogram.record(0.4)
    assert 0.002 < histogram.quantile(0.5) <= 0.005
    assert 0.2 < histogram.quantile(0.99) <= 0.5
    assert Histogram().quantile(0.99) == 0.0
    stats = PoolTimings().stats()
    assert stats == {
        "requests_wait_p50_ms": 0,
        "requests_wait_p99_ms": 0,
        "requests_use_p50_ms": 0,
        "requests_use_p99_ms": 0,
    }


def test_listeners_get_every_sample_and_none_by_default():
    histogram = Histogram()
    assert histogram.listeners == []
    seen: list[float] = []
    histogram.listeners.append(seen.append)
    histogram.record(0.25)
    histogram.record(0.5)
    assert seen == [0.25, 0.5]
    snapshot = histogram.snapshot()
    assert snapshot["count"] == 2 and snapshot["bounds"] == list(BOUNDS)
