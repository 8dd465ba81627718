"""What the time histograms cost a checkout: ``python -m bench.histogram_cost [--django]``.

Runs a checkout + return cycle N times in one greenlet, with this tree's pool.py
and with pool.py as of a git revision without the histograms (``--before``, default
the commit before they were added), alternating the two in one process, R rounds
each; prints the best CPU time per cycle of each and the difference.

* default: the pool alone (the unit tests' fake driver, no server): the pool's own work;
* ``--django``: the benchmark's "checkout+return alone" cycle (``ensure_connection()``
  then request end, as bench/ measures it) through Django and psycopg on a throwaway
  PostgreSQL, the backend's pool class swapped between the two pool.py versions.

Run it in a test virtualenv (it imports tests/), e.g.
``DJANGO_SETTINGS_MODULE=tests.settings.psycopg3 \
.venvs/py311-dj52-psycopg3/bin/python -m bench.histogram_cost --django``.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from time import process_time  # noqa: E402

import gevent  # noqa: E402

from bench.cluster import bench_database  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_pool_at(revision: str):
    """pool.py as of ``revision``, imported as a sibling module of the package."""
    source = subprocess.run(
        ["git", "show", f"{revision}:django_db_geventpool/pool.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = ROOT / "django_db_geventpool" / "_pool_before_histograms.py"
    path.write_text(source)
    try:
        spec = importlib.util.spec_from_file_location(
            "django_db_geventpool._pool_before_histograms", path
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        path.unlink()
    return module


def per_cycle(pool_class, driver, count: int) -> float:
    from tests.unit.test_pool_unit import FakeConnection

    pool = pool_class("bench", driver, max_size=4, health_check_delay=None)
    opener = lambda reconnect: FakeConnection(0)  # noqa: E731

    result = _cpu_per_cycle(lambda: pool.checkout(opener), pool.checkin, count)
    pool.close()
    return result


def per_django_cycle(pool_class, count: int) -> float:
    """CPU per ensure_connection() + request end, the backend creating a ``pool_class``."""
    from django.db import connections

    from bench.references import DjangoClient
    from django_db_geventpool.backends import base

    connections["default"].close_pool()
    base.ConnectionPool = pool_class
    client = DjangoClient()

    result = _cpu_per_cycle(client.acquire, client.release, count)
    connections["default"].close_pool()
    return result


def _cpu_per_cycle(acquire, release, count: int) -> float:
    """CPU seconds per ``release(acquire())`` in a greenlet, after 1,000 to warm up."""

    def cycles(n: int) -> None:
        for _ in range(n):
            release(acquire())

    def run() -> float:
        cycles(1000)
        cpu = process_time()
        cycles(count)
        return (process_time() - cpu) / count

    return gevent.spawn(run).get()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.histogram_cost")
    parser.add_argument("-n", type=int, default=None, help="cycles per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", default="6e3de73", help="a revision without the histograms")
    parser.add_argument("--django", action="store_true", help="through Django and a real server")
    args = parser.parse_args()
    from django_db_geventpool import pool as now

    before = load_pool_at(args.before)
    best = {"with histograms": float("inf"), "without (before)": float("inf")}
    if args.django:
        count = args.n or 20_000
        with bench_database() as (_, db):
            from bench.references import REFERENCES
            from bench.worker import prepare
            from django_db_geventpool import otel

            prepare(REFERENCES["ours[psycopg3]"], db)
            # The no-OpenTelemetry path in both (the old pool has no histograms to attach to).
            otel.attach = lambda pool: False
            measure = lambda cls: per_django_cycle(cls, count)  # noqa: E731
            best = _alternate(measure, before.ConnectionPool, now.ConnectionPool, args.rounds)
    else:
        from tests.unit.test_pool_unit import FakeDriver

        count = args.n or 100_000
        measure = lambda cls: per_cycle(cls, FakeDriver(), count)  # noqa: E731
        best = _alternate(measure, before.ConnectionPool, now.ConnectionPool, args.rounds)
    print(
        f"{count} cycles per round, {'through Django + psycopg' if args.django else 'pool alone'}"
    )
    for name, seconds in best.items():
        print(
            f"{name:<18} {seconds * 1e6:.2f} µs CPU per checkout + checkin (best of {args.rounds})"
        )
    delta = best["with histograms"] - best["without (before)"]
    print(
        f"histograms cost     {delta * 1e6:+.2f} µs per cycle "
        f"({delta / best['without (before)'] * 100:+.1f}%)"
    )
    return 0


def _alternate(measure, before_class, now_class, rounds: int) -> dict[str, float]:
    best = {"with histograms": float("inf"), "without (before)": float("inf")}
    for _ in range(rounds):
        best["without (before)"] = min(best["without (before)"], measure(before_class))
        best["with histograms"] = min(best["with histograms"], measure(now_class))
    return best


if __name__ == "__main__":
    sys.exit(main())
