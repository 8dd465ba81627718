"""The benchmark still runs: a tiny round of the references this environment has.

No timing is asserted (speed is measured only by ``make bench``); the results must
be complete and sane, and the report must render them.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import pytest
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from bench import report
from bench.__main__ import run_worker
from bench.references import MAX_CONNS, REFERENCES
from bench.workloads import Sizes

logger = logging.getLogger(__name__)

DRIVER = "psycopg3" if is_psycopg3 else "psycopg2"
TINY = Sizes(
    overhead_n=20,
    concurrency=(1, 4),
    queries=(1, 2),
    # Long enough for the connection sampler (every 20 ms) to see each window even
    # on a loaded machine.
    duration=0.2,
    warmup=0.02,
    waiters=(2, 20),
    waiting_checkouts=40,
    wait_ms=(5,),
    wait_concurrency=(20,),
    wait_duration=0.1,
)
# What runs in this virtualenv: ours and orm_held with its driver, and the driver
# alone (raw_limit is psycopg2 in the real run; here it uses whichever is installed).
SMOKE_REFERENCES = [
    REFERENCES[f"ours[{DRIVER}]"],
    REFERENCES[f"ours[{DRIVER},hc=0]"],
    REFERENCES[f"ours[{DRIVER},tx]"],
    REFERENCES[f"orm_held[{DRIVER}]"],
    dataclasses.replace(REFERENCES["raw_limit"], driver=DRIVER),
]


@pytest.fixture(scope="module")
def smoke_results(cluster, tmp_path_factory):
    if cluster.psql("SELECT count(*) FROM pg_database WHERE datname = 'bench_smoke'") == "0":
        cluster.psql("CREATE DATABASE bench_smoke")
    db = cluster.database_settings("bench_smoke", tcp=True)
    out = tmp_path_factory.mktemp("bench")
    results = {}
    for ref in SMOKE_REFERENCES:
        logger.info("bench smoke: %s", ref.name)
        results[ref.name] = [
            run_worker(ref, db, TINY, out / f"{ref.slug}.json", python=sys.executable, timeout=120)
        ]
    return results


def test_every_workload_reports_for_every_reference(smoke_results):
    for ref in SMOKE_REFERENCES:
        (result,) = smoke_results[ref.name]
        assert result["reference"] == ref.name
        assert result["meta"]["driver"] == DRIVER
        assert result["meta"]["versions"]["django"]
        overhead = result["overhead"]
        assert overhead["held_us"] > 0 and overhead["cycle_us"] > 0
        assert overhead["checkout_us"] > 0
        rows = {(t["queries"], t["concurrency"]): t for t in result["throughput"]}
        assert set(rows) == {(q, c) for q in TINY.queries for c in TINY.concurrency}
        for row in rows.values():
            assert row["errors"] == 0, (ref.name, row)
            assert row["requests"] > 0 and row["rps"] > 0
            assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert result["rss_rest_mb"] > 0 and result["rss_load_mb"] > 0
        if not ref.external_wait:
            assert "external_wait" not in result
            continue
        waits = {(t["wait_ms"], t["concurrency"]): t for t in result["external_wait"]}
        assert set(waits) == {(w, c) for w in TINY.wait_ms for c in TINY.wait_concurrency}
        for row in waits.values():
            assert row["errors"] == 0 and row["queries"] == 2, (ref.name, row)
            # Each request waits W between its two queries.
            assert row["requests"] > 0 and row["p50_ms"] >= row["wait_ms"]


def test_external_wait_respects_the_cap_in_transaction_mode(smoke_results):
    """The speed-up is measured by ``make bench``; here: the cap holds, orm_held has none."""
    (tx,) = smoke_results[f"ours[{DRIVER},tx]"]
    (held,) = smoke_results[f"orm_held[{DRIVER}]"]
    assert 1 <= tx["external_wait"][0]["peak_conns"] <= MAX_CONNS
    assert held["external_wait"][0]["peak_conns"] > MAX_CONNS


def test_caps_and_queues_are_seen_where_they_apply(smoke_results):
    for ref in SMOKE_REFERENCES:
        (result,) = smoke_results[ref.name]
        peaks = [t["peak_conns"] for t in result["throughput"]]
        if ref.capped:
            # Never above the cap; and the sampler saw the load (a window of a busy
            # machine may pass between two of its samples: not every row need show it).
            assert all(p <= MAX_CONNS for p in peaks), (ref.name, peaks)
            assert max(peaks) >= 1, (ref.name, peaks)
            assert [w["waiters"] for w in result["waiting"]] == list(TINY.waiters)
            assert all(w["us_per_checkout"] > 0 and w["errors"] == 0 for w in result["waiting"])
            assert all(w["cpu_us_per_checkout"] > 0 for w in result["waiting"])
        else:
            # One connection per greenlet: at least as many as the most greenlets.
            assert max(peaks) >= max(TINY.concurrency), (ref.name, peaks)
            assert result["waiting"] is None


def test_report_renders_medians_ratios_and_targets(smoke_results, tmp_path):
    summary = report.summarize(smoke_results)
    assert set(summary) == {ref.name for ref in SMOKE_REFERENCES}
    ours = summary[f"ours[{DRIVER}]"]
    assert report.orm_held_of(ours["meta"]) in summary
    assert ours["throughput"]["q1c4"]["rps"] > 0
    # Without old_geventpool only the targets against orm_held and the waiting one remain.
    names = [row["target"] for row in report.targets(summary)]
    assert any("orm_held" in name for name in names)
    assert any("flat" in name for name in names)
    assert any("external wait" in name and "4×" in name for name in names)
    assert any("CPU per 1-query request" in name for name in names)
    machine = {
        "cpu": "test",
        "cores": 2,
        "kernel": "x",
        "loadavg_start": 0.0,
        "loadavg_end": 0.0,
        "seconds": 1,
        "postgresql": "15",
    }
    path = tmp_path / "benchmarks.md"
    report.write_markdown(path, summary, machine, 1, TINY, "make bench")
    text = path.read_text()
    for heading in (
        "## Targets",
        "## Checkout overhead",
        "## Throughput and latency: 1-query requests",
        "## Throughput and latency: 2-query requests",
        "## Scale of waiting",
        "## Memory",
        "## Requests with an external wait",
        "## Versions and machine",
    ):
        assert heading in text
    for ref in SMOKE_REFERENCES:
        assert f"`{ref.name}`" in text
    # raw_limit's process also measures the bare FIFO hand-over, for comparison.
    assert summary["raw_limit"]["waiting_floor"] is not None
    assert "`gevent FIFO floor`" in text
    assert "`make bench`" in text


def test_counted_work_runs_and_renders(cluster, smoke_results, tmp_path):
    """``make bench-work``'s worker and arithmetic (valgrind itself is not needed here)."""
    from bench import countwork

    db = cluster.database_settings("bench_smoke", tcp=True)
    ours = countwork.Subject(f"ours[{DRIVER}]", REFERENCES[f"ours[{DRIVER}]"])
    floor = dataclasses.replace(ours, label=countwork.FLOOR, floor=True)
    for subject in (ours, floor):
        result = countwork.run_waiting_worker(
            subject, 20, 40, db=db, run_dir=tmp_path, python=sys.executable
        )
        assert result["waiters"] == 20 and result["checkouts"] == 40
        assert result["errors"] == 0 and result["us_per_checkout"] > 0
    trace = tmp_path / "run.cachegrind"
    trace.write_text(
        "desc: I1 cache: 65536 B, 64 B, 2-way associative\ncmd: python\n"
        "events: Ir D1mr D1mw DLmr DLmw\nfl=x\n1 2 3 4 5 6\n"
        "summary: 1000 40 10 7 3\n"
    )
    short = countwork._cachegrind_totals(trace)
    assert short == {"Ir": 1000, "D1mr": 40, "D1mw": 10, "DLmr": 7, "DLmw": 3}
    long = {"Ir": 5000, "D1mr": 140, "D1mw": 30, "DLmr": 27, "DLmw": 23}
    assert countwork.per_checkout(short, long, 100) == {
        "instructions": 40.0,
        "d1_misses": 1.2,
        "ll_misses": 0.4,
    }
    rows = {
        "ours": {
            10: {"instructions": 100.0, "d1_misses": 10.0, "ll_misses": 1.0},
            5000: {"instructions": 110.0, "d1_misses": 12.0, "ll_misses": 51.0},
        }
    }
    machine = {"cpu": "test", "cores": 2, "kernel": "x", "seconds": 1}
    countwork.write_markdown(tmp_path / "work.md", rows, machine, 500, 2500, "Python 3")
    text = (tmp_path / "work.md").read_text()
    assert "| `ours` | 5,000 | 110 | 12 | 51.0 |" in text
    assert "| `ours` | 1.10× | 1.20× | +50 |" in text
