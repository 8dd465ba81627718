"""Run the whole benchmark: ``python -m bench`` (``make bench`` prepares the venvs first).

Starts one throwaway PostgreSQL, then runs every reference in processes of its
own, round after round (round 1 of every reference, then round 2, ...), so that
a noisy moment on a shared machine hits all of them alike; each figure is the
median over the rounds. Writes the raw results to ``bench/results/`` and the
report to ``docs/benchmarks.md`` and ``docs/benchmarks.png``.

Options: ``--rounds N`` (default 3), ``--only NAME[,NAME]``, ``--workloads
NAME[,NAME]`` (overhead, throughput, waiting, external_wait; default all), ``--quick`` (tiny
sizes, to check that everything runs; the report then goes to the run's results
directory), ``--out DIR`` (where the report goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.cluster import ROOT, bench_database
from bench.references import REFERENCES, Reference
from bench.workloads import Sizes

RESULTS = ROOT / "bench" / "results"
WORKER_TIMEOUT = 240

logger = logging.getLogger("bench")

QUICK_SIZES = Sizes(
    overhead_n=50,
    concurrency=(1, 10, 200),
    queries=(1, 5),
    duration=0.1,
    warmup=0.05,
    waiters=(10, 200),
    waiting_checkouts=400,
    wait_ms=(5,),
    wait_concurrency=(20,),
    wait_duration=0.1,
)
WORKLOADS = ("overhead", "throughput", "waiting", "external_wait")


def worker_pythonpath() -> Path:
    """A directory holding only ``bench``: workers must not import our source tree
    from the repository root (the old package's venv has a package of the same name)."""
    path = RESULTS / "pythonpath"
    path.mkdir(parents=True, exist_ok=True)
    link = path / "bench"
    if not link.is_symlink():
        try:
            link.symlink_to(ROOT / "bench")
        except FileExistsError:
            pass  # another run (a parallel test session) made it first
    return path


def run_worker_process(
    ref: Reference,
    config: dict,
    *,
    label: str,
    python: str | None = None,
    timeout: float = WORKER_TIMEOUT,
    extra_env: dict[str, str] | None = None,
    wrapper: tuple[str, ...] = (),
) -> dict:
    """Run `bench.worker` on ``config`` in a new process (under ``wrapper``, e.g. valgrind,
    if given) with ``ref``'s virtualenv, or ``python``; return what it wrote to
    ``config["output"]``."""
    output = Path(config["output"])
    config_path = output.with_suffix(".config.json")
    config_path.write_text(json.dumps(config))
    python = python or str(ROOT / ".venvs" / ref.venv / "bin" / "python")
    env = {**os.environ, "PYTHONPATH": str(worker_pythonpath()), **(extra_env or {})}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    started = time.monotonic()
    proc = subprocess.run(
        [
            *wrapper,
            python,
            "-P",
            "-m",
            "gevent.monkey",
            "--module",
            "bench.worker",
            str(config_path),
        ],
        cwd=output.parent,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{label} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-5000:]}"
        )
    logger.info("%-40s %.1fs", label, time.monotonic() - started)
    return json.loads(output.read_text())


def run_worker(
    ref: Reference,
    db: dict,
    sizes: Sizes,
    output: Path,
    python: str | None = None,
    timeout: float = WORKER_TIMEOUT,
    workloads: tuple[str, ...] = WORKLOADS,
) -> dict:
    """Run one round of ``ref`` in a new process; return its results."""
    config = {
        "reference": dataclasses.asdict(ref),
        "db": db,
        "sizes": dataclasses.asdict(sizes),
        "output": str(output),
        "workloads": list(workloads),
    }
    return run_worker_process(ref, config, label=ref.name, python=python, timeout=timeout)


def split_names(text: str) -> list[str]:
    """``"a,ours[psycopg3,tx]"`` -> ``["a", "ours[psycopg3,tx]"]``: commas inside brackets stay."""
    names, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += char
    return [name for name in [*names, current] if name]


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": os.uname().release,
        "loadavg_start": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated reference names")
    parser.add_argument(
        "--workloads",
        default="",
        help=f"comma-separated workloads ({', '.join(WORKLOADS)}; default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument(
        "--out",
        default=None,
        help="where the report goes (default: docs/, or the run's results with --quick)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    refs = list(REFERENCES.values())
    if args.only:
        wanted = split_names(args.only)
        unknown = [w for w in wanted if w not in REFERENCES]
        if unknown:
            parser.error(f"unknown references {unknown}; known: {list(REFERENCES)}")
        refs = [REFERENCES[w] for w in wanted]
    sizes = QUICK_SIZES if args.quick else Sizes()
    workloads = tuple(args.workloads.split(",")) if args.workloads else WORKLOADS
    if set(workloads) - set(WORKLOADS):
        parser.error(
            f"unknown workloads {sorted(set(workloads) - set(WORKLOADS))}; known: {WORKLOADS}"
        )

    started = time.monotonic()
    machine = machine_info()
    run_dir = RESULTS / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {ref.name: [] for ref in refs}
    # Room for the references without a cap (1,000 greenlets, 1,000 connections).
    with bench_database(max_connections="1200", shared_buffers="128MB") as (cluster, db):
        machine["postgresql"] = cluster.psql("SHOW server_version")
        for round_no in range(1, args.rounds + 1):
            logger.info("round %d of %d", round_no, args.rounds)
            for ref in refs:
                output = run_dir / f"{ref.slug}.{round_no}.json"
                results[ref.name].append(run_worker(ref, db, sizes, output, workloads=workloads))
    machine["loadavg_end"] = os.getloadavg()[0]
    machine["seconds"] = round(time.monotonic() - started)
    summary = report.summarize(results)
    (run_dir / "summary.json").write_text(
        json.dumps({"machine": machine, "summary": summary}, indent=1)
    )
    out = Path(args.out) if args.out else run_dir if args.quick else ROOT / "docs"
    out.mkdir(parents=True, exist_ok=True)
    command = "make bench" if not args.quick else "python -m bench --quick"
    if args.only or args.workloads:
        command = (
            "make bench BENCH_ARGS='"
            + " ".join(
                a
                for a in (
                    f"--only {args.only}" if args.only else "",
                    f"--workloads {args.workloads}" if args.workloads else "",
                    f"--rounds {args.rounds}",
                    "--quick" if args.quick else "",
                )
                if a
            )
            + "'"
        )
    report.write_markdown(out / "benchmarks.md", summary, machine, args.rounds, sizes, command)
    report.write_plot(out / "benchmarks.png", summary)
    logger.info(
        "wrote %s and %s in %ds", out / "benchmarks.md", out / "benchmarks.png", machine["seconds"]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
