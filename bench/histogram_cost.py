"""What the time histograms cost a checkout: ``python -m bench.histogram_cost [-n N] [--rounds R]``.

Runs the pool's checkout + checkin cycle (no server: the fake driver of the unit
tests, so the pool's own work is all that is timed) N times in one greenlet, with
this tree's pool.py and with the same pool.py as of a git revision without the
histograms (``--before``, default the commit before they were added), alternating
the two in one process, R rounds each; prints the best CPU time per cycle of each.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from time import process_time  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_pool_at(revision: str):
    """pool.py as of ``revision``, imported as a sibling module of the package."""
    source = subprocess.run(["git", "show", f"{revision}:django_db_geventpool/pool.py"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
    path = ROOT / "django_db_geventpool" / "_pool_before_histograms.py"
    path.write_text(source)
    try:
        spec = importlib.util.spec_from_file_location(
            "django_db_geventpool._pool_before_histograms", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        path.unlink()
    return module


def per_cycle(pool_class, driver, count: int) -> float:
    from tests.test_pool_unit import FakeConnection

    pool = pool_class("bench", driver, max_size=4, health_check_delay=None)
    opener = lambda reconnect: FakeConnection(0)  # noqa: E731

    def cycles(n: int) -> None:
        checkout, checkin = pool.checkout, pool.checkin
        for _ in range(n):
            checkin(checkout(opener))

    def run() -> float:
        cycles(1000)
        cpu = process_time()
        cycles(count)
        return (process_time() - cpu) / count

    result = gevent.spawn(run).get()
    pool.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.histogram_cost")
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", default="6e3de73", help="a revision without the histograms")
    args = parser.parse_args()
    from django_db_geventpool import pool as now
    from tests.test_pool_unit import FakeDriver

    before = load_pool_at(args.before)
    best = {"with histograms": float("inf"), "without (before)": float("inf")}
    for _ in range(args.rounds):
        best["without (before)"] = min(best["without (before)"],
                                       per_cycle(before.ConnectionPool, FakeDriver(), args.n))
        best["with histograms"] = min(best["with histograms"],
                                      per_cycle(now.ConnectionPool, FakeDriver(), args.n))
    for name, seconds in best.items():
        print(f"{name:<18} {seconds * 1e6:.2f} µs CPU per checkout + checkin (best of {args.rounds})")
    delta = best["with histograms"] - best["without (before)"]
    print(f"histograms cost     {delta * 1e6:+.2f} µs per cycle "
          f"({delta / best['without (before)'] * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
