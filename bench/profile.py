"""Where a checkout's time goes: ``python -m bench.profile REFERENCE [--query] [-n N]``.

Runs one reference's checkout + return cycle (with ``--query``: checkout + ORM
query + return) N times in one greenlet on a throwaway PostgreSQL, prints the CPU
and wall time per cycle, then a pyinstrument profile of the same loop. Run it in
the reference's virtualenv, e.g. ``.venvs/bench-psycopg2/bin/python -m bench.profile
'ours[psycopg2]'``; ``PROFILER=pyinstrument bench/prepare`` installs pyinstrument
into our bench virtualenvs. Our own references only: the old package's virtualenv
cannot import this repository's package.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402
from time import perf_counter, process_time  # noqa: E402

import gevent  # noqa: E402

from bench.cluster import bench_database  # noqa: E402
from bench.references import REFERENCES  # noqa: E402
from bench.worker import prepare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("reference", choices=[n for n, r in REFERENCES.items() if r.kind != "old"])
    parser.add_argument("--query", action="store_true", help="run the ORM query in each cycle")
    parser.add_argument("-n", type=int, default=20000)
    args = parser.parse_args()
    ref = REFERENCES[args.reference]
    try:
        from pyinstrument import Profiler
    except ImportError:
        parser.error("pyinstrument is not installed: PROFILER=pyinstrument bench/prepare")

    with bench_database() as (_, db):
        client = prepare(ref, db)

        def cycles(count: int) -> None:
            acquire, query, release = client.acquire, client.query, client.release
            for _ in range(count):
                handle = acquire()
                if args.query:
                    query(handle)
                release(handle)

        def run() -> None:
            cycles(500)
            wall, cpu = perf_counter(), process_time()
            cycles(args.n)
            wall, cpu = perf_counter() - wall, process_time() - cpu
            print(
                f"{ref.name}: {cpu / args.n * 1e6:.1f} µs CPU, "
                f"{wall / args.n * 1e6:.1f} µs wall per cycle"
            )
            profiler = Profiler(interval=0.0001)
            profiler.start()
            cycles(args.n)
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False))

        # In a Greenlet, as a request in a gevent worker (the lease links to it).
        gevent.spawn(run).get()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
