"""Count the work of one checkout at 10, 1,000 and 5,000 waiters, free of timing noise.

``make bench-work`` (needs valgrind: ``apt-get install valgrind``) runs the
benchmark's waiting workload under valgrind's cachegrind, which counts the
instructions executed and simulates the caches, so two runs give the same
figures however busy the machine is. Each (reference, waiters) pair runs twice,
with ``--short`` and ``--long`` steady-state checkouts; the difference divided
by the difference in checkouts is the cost of one checkout, with start-up,
greenlet creation and exit cancelled out.

The cache model: a first-level data cache as on this machine, and a last level
of 1 MiB (16-way, 64-byte lines), the per-core L2 of a small server: the part
of the cache a process keeps when other work shares the big one. Its misses
count the memory a checkout touches that no recent checkout touched, which is
what grows when the greenlet woken has been queued behind thousands of others.

Writes ``docs/benchmarks-work.md`` (``--out`` to change), raw results under
``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.__main__ import RESULTS, machine_info, run_worker_process
from bench.cluster import ROOT, bench_database
from bench.references import MAX_CONNS, REFERENCES, Reference
from bench.workloads import FLOOR

logger = logging.getLogger("bench.countwork")

WAITERS = (10, 1000, 5000)
LAST_LEVEL_CACHE = "1048576,16,64"  # size, associativity, line size


@dataclass(frozen=True)
class Subject:
    """What runs the waiting workload: a reference, or the FIFO floor in its process."""

    label: str
    ref: Reference
    floor: bool = False


SUBJECTS = (
    Subject("ours[psycopg3]", REFERENCES["ours[psycopg3]"]),
    Subject("ours[psycopg2]", REFERENCES["ours[psycopg2]"]),
    Subject(FLOOR, REFERENCES["ours[psycopg3]"], floor=True),
)


def _cachegrind_totals(path: Path) -> dict[str, int]:
    """The ``summary:`` line of a cachegrind output file, by event name."""
    events: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            return dict(zip(events, map(int, line.split()[1:]), strict=True))
    raise RuntimeError(f"{path}: no cachegrind summary")


def _stem(subject: Subject, waiters: int, checkouts: int) -> str:
    """A file name stem for one run."""
    return "".join(
        c if c.isalnum() or c == "-" else "_" for c in f"{subject.label}-{waiters}-{checkouts}"
    )


def run_waiting_worker(
    subject: Subject,
    waiters: int,
    checkouts: int,
    *,
    db: dict,
    run_dir: Path,
    python: str | None = None,
    trace: Path | None = None,
) -> dict:
    """Run the waiting workload once in a worker process (under cachegrind when ``trace``
    names its output file); the worker's result."""
    stem = _stem(subject, waiters, checkouts)
    config = {
        "reference": asdict(subject.ref),
        "db": db,
        "output": str(run_dir / f"{stem}.json"),
        "waiting_only": {"waiters": waiters, "checkouts": checkouts, "floor": subject.floor},
    }
    wrapper: tuple[str, ...] = ()
    if trace is not None:
        wrapper = (
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=yes",
            f"--LL={LAST_LEVEL_CACHE}",
            f"--cachegrind-out-file={trace}",
        )
    # A fixed hash seed: the same dict layouts, so the same work, in every run.
    result = run_worker_process(
        subject.ref,
        config,
        label=stem,
        python=python,
        timeout=1800,
        extra_env={"PYTHONHASHSEED": "0"},
        wrapper=wrapper,
    )
    if result["errors"]:
        raise RuntimeError(f"{stem}: {result['errors']} checkouts failed")
    return result


def run_once(
    subject: Subject, waiters: int, checkouts: int, *, db: dict, run_dir: Path
) -> tuple[dict, dict[str, int]]:
    """One run under cachegrind: the worker's result and cachegrind's event totals."""
    trace = run_dir / f"{_stem(subject, waiters, checkouts)}.cachegrind"
    result = run_waiting_worker(subject, waiters, checkouts, db=db, run_dir=run_dir, trace=trace)
    return result, _cachegrind_totals(trace)


def per_checkout(short: dict[str, int], long: dict[str, int], checkouts: int) -> dict[str, float]:
    """Instructions and misses of one checkout, from two runs that differ by ``checkouts``."""

    def delta(*events: str) -> float:
        return sum(long[e] - short[e] for e in events) / checkouts

    return {
        "instructions": delta("Ir"),
        "d1_misses": delta("D1mr", "D1mw"),
        "ll_misses": delta("DLmr", "DLmw"),
    }


def write_markdown(
    path: Path,
    rows: dict[str, dict[int, dict[str, float]]],
    machine: dict,
    short: int,
    long: int,
    versions: str,
) -> None:
    lines = [
        "# Benchmarks: the work of a checkout, counted",
        "",
        "The [benchmark](benchmarks.md) times a checkout with 10, 1,000 and 5,000 greenlets "
        "queued on `MAX_CONNS=10`. Timings on a shared machine are noisy, and they mix two "
        "things: the work a checkout does, and how far away in memory that work's data is. "
        "This page separates them. The same waiting workload runs under valgrind's "
        "cachegrind, which counts every instruction executed and simulates the caches, "
        "so the figures do not depend on what else the machine was doing.",
        "",
        f"Each figure is per checkout: two runs with {short:,} and {long:,} steady-state "
        "checkouts, the difference divided by the difference in checkouts (start-up, "
        "greenlet creation and exit cancel out). Cache model: the first-level data cache of "
        "this machine, and a 1 MiB, 16-way last level, the per-core L2 of a small server. "
        "A last-level miss is memory no recent checkout touched: with thousands of waiters "
        "served first come, first served, the greenlet woken is the one that has waited "
        "longest, and its stack, its frames and its Django connection wrapper are cold.",
        "",
        "| reference | waiters | instructions | L1 data misses | 1 MiB last-level misses |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, by_waiters in rows.items():
        for waiters, figures in by_waiters.items():
            # With next to no misses, the collector's timing can make the difference of
            # the two runs slightly negative: none is what it means.
            figures = {**figures, "ll_misses": max(figures["ll_misses"], 0.0)}
            lines.append(
                f"| `{label}` | {waiters:,} | {figures['instructions']:,.0f} | "
                f"{figures['d1_misses']:,.0f} | {figures['ll_misses']:,.1f} |"
            )
    lines += [
        "",
        "Growth from the fewest to the most waiters (largest / smallest; for last-level misses, "
        "the most per checkout minus those with the fewest waiters):",
        "",
        "| reference | instructions | L1 data misses | last-level misses added |",
        "|---|---:|---:|---:|",
    ]
    for label, by_waiters in rows.items():
        cells = []
        for key in ("instructions", "d1_misses"):
            values = [figures[key] for figures in by_waiters.values()]
            cells.append(f"{max(values) / min(values):.2f}×")
        # Next to no last-level misses with few waiters: a ratio would say little.
        misses = [figures["ll_misses"] for figures in by_waiters.values()]
        cells.append(f"{max(misses) - misses[0]:+,.0f}")
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "How to read it: a pool whose work grew with the queue (a scan of the waiters, a "
        "list of links to notify) would show it in the instruction count. The misses are "
        "the price of first come, first served itself; the FIFO floor (a slot count and "
        "a queue of gevent hub waiters, nothing else) pays it too, on the little memory "
        "it touches. `old_geventpool` is not here: it has no real cap (each of the thousands "
        "of greenlets opens a connection of its own), so it has no queue to count.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}; "
        f"{versions}. Run time {machine['seconds']} s.",
        "",
        "Reproduce: `make bench-work` (needs valgrind: `apt-get install valgrind`).",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.countwork")
    parser.add_argument("--short", type=int, default=500, help="steady-state checkouts, short run")
    parser.add_argument("--long", type=int, default=2500, help="steady-state checkouts, long run")
    parser.add_argument("--waiters", default=",".join(map(str, WAITERS)))
    parser.add_argument("--only", default="", help="comma-separated subjects")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed: apt-get install valgrind")
    if args.long <= args.short:
        parser.error("--long must be larger than --short")
    waiters = [int(w) for w in args.waiters.split(",")]
    subjects = list(SUBJECTS)
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {s.label for s in SUBJECTS}]
        if unknown:
            parser.error(f"unknown subjects {unknown}; known: {[s.label for s in SUBJECTS]}")
        subjects = [s for s in SUBJECTS if s.label in wanted]

    started = time.monotonic()
    machine = machine_info()
    run_dir = RESULTS / time.strftime("work-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    # One valgrind per core: each is single-threaded, and their counts do not
    # depend on sharing the machine. Each holds up to MAX_CONNS connections.
    parallel = os.cpu_count() or 1
    with bench_database(max_connections=str(20 + (MAX_CONNS + 1) * parallel)) as (_, db):
        with ThreadPoolExecutor(max_workers=parallel) as executor:
            futures = {
                (subject.label, w, n): executor.submit(
                    run_once, subject, w, n, db=db, run_dir=run_dir
                )
                for subject in subjects
                for w in waiters
                for n in (args.short, args.long)
            }
            runs = {key: future.result() for key, future in futures.items()}
    totals = {key: counted for key, (_, counted) in runs.items()}
    rows = {
        subject.label: {
            w: per_checkout(
                totals[(subject.label, w, args.short)],
                totals[(subject.label, w, args.long)],
                args.long - args.short,
            )
            for w in waiters
        }
        for subject in subjects
    }
    machine["seconds"] = round(time.monotonic() - started)
    (run_dir / "summary.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    # The versions of the first run's process (every subject runs Python, Django and gevent).
    meta = next(iter(runs.values()))[0]["meta"]
    found = meta["versions"]
    versions = (
        f"Python {meta['python']}, Django {found['django']}, gevent {found['gevent']}, "
        f"greenlet {found['greenlet']}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / "benchmarks-work.md", rows, machine, args.short, args.long, versions)
    logger.info("wrote %s in %ds", out / "benchmarks-work.md", machine["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
