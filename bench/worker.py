"""One reference, one process: ``python -m bench.worker CONFIG.json``.

Patches with gevent before anything else is imported (as the gevent monkey
launcher would), sets Django up for the reference, runs every workload once and
writes the results as JSON to the path the config names. The orchestrator runs
this several times per reference (rounds) and takes medians. With a
``"waiting_only"`` entry in the config it runs only the waiting workload, once
(``bench.countwork`` runs it so under cachegrind).

CONFIG: ``{"reference": {...Reference fields...}, "db": {NAME, USER, PASSWORD,
HOST, PORT}, "sizes": {...Sizes fields...}, "output": "path.json"}``, and optionally
``"workloads": [...]`` (a subset of `WORKLOADS`; default: all).
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from importlib import metadata  # noqa: E402
from time import perf_counter  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from bench.references import MAX_CONNS, Reference, django_settings, make_client, raw_connect  # noqa: E402
from bench.workloads import (  # noqa: E402
    FifoFloor,
    Sampler,
    Sizes,
    checkout_overhead,
    external_wait,
    rss_mb,
    throughput,
    waiting_scale,
)

logger = logging.getLogger("bench.worker")

# What a run can be limited to (python -m bench --workloads ...).
WORKLOADS = ("overhead", "throughput", "waiting", "external_wait")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _dsn(db: dict[str, Any]) -> str:
    return (
        f"host={db['HOST']} port={db['PORT']} dbname={db['NAME']} "
        f"user={db['USER']} password={db['PASSWORD']}"
    )


def _setup_django(ref: Reference, db: dict[str, Any]) -> None:
    import django
    from django.conf import settings

    settings.configure(**django_settings(ref, db))
    django.setup()
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if is_psycopg3 != (ref.driver == "psycopg3"):
        raise SystemExit(f"{ref.name}: Django loaded the wrong driver in {sys.prefix}")
    if ref.kind in ("ours", "old"):
        import django_db_geventpool

        # The old package's venv must not see our source tree, and vice versa.
        is_old = _version("django-db-geventpool") == "4.0.8"
        if is_old != (ref.kind == "old"):
            raise SystemExit(
                f"{ref.name}: wrong django_db_geventpool ({django_db_geventpool.__file__})"
            )


def _ensure_table(driver: str, dsn: str) -> None:
    conn = raw_connect(driver, dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS bench_item "
                "(id serial PRIMARY KEY, name varchar(100) NOT NULL)"
            )
            cursor.execute(
                "INSERT INTO bench_item (id, name) VALUES (1, 'one') ON CONFLICT DO NOTHING"
            )
    finally:
        conn.close()


def prepare(ref: Reference, db: dict[str, Any]) -> Any:
    """What every run of ``ref`` needs first: the table, a cooperative driver, Django
    (unless the driver alone is measured); the client to measure."""
    dsn = _dsn(db)
    _ensure_table(ref.driver, dsn)
    if ref.driver == "psycopg2":
        # Before any pooled connection: the old package relies on the user doing
        # this, and the stock backend needs it to be cooperative at all.
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
    if ref.kind != "raw":
        _setup_django(ref, db)
    return make_client(ref, dsn)


def run(config: dict[str, Any]) -> dict[str, Any]:
    ref = Reference(**config["reference"])
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["sizes"].items()})
    db = config["db"]
    client = prepare(ref, db)
    result: dict[str, Any] = {"reference": ref.name, "meta": _meta(ref)}

    workloads = config.get("workloads") or WORKLOADS

    def measure() -> None:
        # At rest: set up, one connection opened and returned.
        handle = client.acquire()
        client.query(handle)
        client.release(handle)
        result["rss_rest_mb"] = rss_mb()
        if "overhead" in workloads:
            clock = perf_counter()
            result["overhead"] = checkout_overhead(client, sizes.overhead_n)
            seconds["overhead"] = perf_counter() - clock
        sampler_conn = raw_connect(ref.driver, _dsn(db))
        sampler = Sampler(sampler_conn, "bench-" + ref.slug)
        try:
            if "throughput" in workloads:
                clock = perf_counter()
                result["throughput"] = [
                    row
                    for c in sizes.concurrency
                    for row in throughput(
                        client, c, sizes.queries, sizes.duration, sizes.warmup, sampler
                    )
                ]
                seconds["throughput"] = perf_counter() - clock
                loads = [
                    t["peak_rss_mb"]
                    for t in result["throughput"]
                    if t["concurrency"] == max(sizes.concurrency)
                ]
                result["rss_load_mb"] = max(loads)
                result["rss_load_concurrency"] = max(sizes.concurrency)
            if "external_wait" in workloads and ref.external_wait:
                clock = perf_counter()
                result["external_wait"] = [
                    external_wait(client, c, w, sizes.wait_duration, sizes.warmup, sampler)
                    for w in sizes.wait_ms
                    for c in sizes.wait_concurrency
                ]
                seconds["external_wait"] = perf_counter() - clock
        finally:
            sampler.stop()
            sampler_conn.close()
        if "waiting" in workloads:
            clock = perf_counter()
            result["waiting"] = (
                [
                    waiting_scale(client, w, MAX_CONNS, sizes.waiting_checkouts)
                    for w in sizes.waiters
                ]
                if ref.capped
                else None
            )
            if ref.kind == "raw":
                floor = FifoFloor(MAX_CONNS)
                result["waiting_floor"] = [
                    waiting_scale(floor, w, MAX_CONNS, sizes.waiting_checkouts)
                    for w in sizes.waiters
                ]
            seconds["waiting"] = perf_counter() - clock

    seconds: dict[str, float] = {}
    result["seconds"] = seconds
    try:
        gevent.spawn(measure).get()
    finally:
        client.close()
    return result


def _meta(ref: Reference) -> dict[str, Any]:
    dists = [
        "django",
        "gevent",
        "greenlet",
        "psycopg",
        "psycopg-binary",
        "psycopg-pool",
        "psycopg2-binary",
        "psycogreen",
        "django-db-geventpool",
    ]
    return {
        "name": ref.name,
        "description": ref.description,
        "driver": ref.driver,
        "kind": ref.kind,
        "capped": ref.capped,
        "python": platform.python_version(),
        "versions": {d: v for d in dists if (v := _version(d))},
    }


def run_waiting_only(config: dict[str, Any]) -> dict[str, Any]:
    """Only the waiting workload, once (``config["waiting_only"]``: waiters, checkouts,
    floor): what `bench.countwork` runs under cachegrind."""
    ref = Reference(**config["reference"])
    only = config["waiting_only"]
    client = prepare(ref, config["db"])
    try:
        # One connection opened and returned first, as in the full run.
        handle = client.acquire()
        client.release(handle)
        subject = FifoFloor(MAX_CONNS) if only["floor"] else client
        waiting = gevent.spawn(
            waiting_scale, subject, only["waiters"], MAX_CONNS, only["checkouts"]
        ).get()
        return {**waiting, "meta": _meta(ref)}
    finally:
        client.close()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    with open(sys.argv[1]) as f:
        config = json.load(f)
    result = run_waiting_only(config) if "waiting_only" in config else run(config)
    with open(config["output"], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
