"""``make demo``: gunicorn + gevent workers on the pool, a database restart under load.

What it does, start to end (about half a minute):

1. starts a throwaway PostgreSQL (initdb in a temp dir, a free loopback port);
2. migrates the example project and adds a few products;
3. starts gunicorn through the repository's ``gunicorn.conf.py``: 2 gevent workers,
   ``MAX_CONNS=5`` each;
4. sends HTTP requests to a view that queries the database, 100 at a time, and
   restarts PostgreSQL (``pg_ctl restart -m fast``) halfway through;
5. reports requests, failures (all, and those started after the restart completed:
   there must be none), latency, the peak of server connections against the cap,
   the checkout wait p50/p99 from each worker's pool histograms, and the pools' stats
   from each worker's stats view.

Every process it started is stopped at the end, also on Ctrl-C. Exit status: 0 if
no request started after the restart failed, 1 otherwise, 130 on Ctrl-C.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402
from time import monotonic  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.support.httpload import RequestResult, run_load  # noqa: E402
from tests.support.pgserver import PostgresCluster, ServerBinariesMissing  # noqa: E402
from tests.support.servers import example_env, migrate_example, start_gunicorn  # noqa: E402

logger = logging.getLogger("demo")

WORKERS = 2
MAX_CONNS = 5
REQUESTS = int(os.environ.get("DEMO_REQUESTS", "6000"))
CONCURRENCY = 100
DATABASE = "example"
APP_NAME = "geventpool-demo"
BAR_WIDTH = 40


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Progress:
    """A one-line progress bar on a terminal; a line every 10% otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.note = ""
        self.tty = sys.stdout.isatty()
        self._last_decile = -1

    def add(self, result: RequestResult) -> None:
        self.done += 1
        self.failed += not result.ok
        if not self.tty:
            decile = self.done * 10 // self.total
            if decile != self._last_decile:
                self._last_decile = decile
                say(f"  {self.line()}")

    def line(self) -> str:
        filled = BAR_WIDTH * self.done // self.total
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = f"[{bar}] {self.done:>5}/{self.total} requests, {self.failed} failed {self.note}"
        return line.rstrip()

    def draw_forever(self) -> None:
        while self.tty:
            sys.stdout.write("\r  " + self.line() + "\x1b[K")
            sys.stdout.flush()
            gevent.sleep(0.1)

    def finish(self) -> None:
        if self.tty:
            sys.stdout.write("\r  " + self.line() + "\x1b[K\n")
            sys.stdout.flush()


class ServerConnections:
    """Counts the example's connections in pg_stat_activity, reconnecting across restarts."""

    def __init__(self, cluster: PostgresCluster) -> None:
        self.cluster = cluster
        self.peak = 0
        self._stop = gevent.event.Event()

    def _connect(self):
        try:
            import psycopg
        except ImportError:
            import psycopg2

            conn = psycopg2.connect(self.cluster.dsn(DATABASE))
            conn.autocommit = True
            return conn
        return psycopg.connect(self.cluster.dsn(DATABASE), autocommit=True)

    def run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._connect()
                cursor = conn.cursor()
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [APP_NAME]
                )
                self.peak = max(self.peak, cursor.fetchone()[0])
                cursor.close()
            except Exception:  # the server is restarting: try again
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(0.01)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()


def fetch_worker_stats(port: int, attempts: int = 40) -> dict[int, dict[str, int]]:
    """Each worker's pool stats, from its stats view (new connections land on either worker)."""
    seen: dict[int, dict[str, int]] = {}
    for _ in range(attempts):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/pool/stats", headers={"Connection": "close"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
        seen[body["pid"]] = body["databases"]["default"]
        if len(seen) == WORKERS:
            break
    return seen


def report(load, restart_done: float | None, peak: int, worker_stats: dict) -> bool:
    results = load.results
    after = [r for r in results if restart_done is not None and r.started >= restart_done]
    failed_after = [r for r in after if not r.ok]
    cap = WORKERS * MAX_CONNS
    say()
    say("== report ==")
    say(f"requests                          {len(results)}")
    say(f"failed, in all                    {len(load.failures)}")
    say(f"started after the restart         {len(after)}, of which failed: {len(failed_after)}")
    say(
        f"latency p50 / p99                 {load.percentile_ms(0.50):.1f} ms / "
        f"{load.percentile_ms(0.99):.1f} ms"
    )
    say(
        f"peak server connections           {peak}  (cap: {WORKERS} workers x "
        f"MAX_CONNS {MAX_CONNS} = {cap})"
    )
    keys = (
        "pool_max",
        "pool_size",
        "pool_available",
        "requests_waiting",
        "requests_num",
        "requests_queued",
        "requests_wait_ms",
        "requests_wait_p50_ms",
        "requests_wait_p99_ms",
        "requests_use_p99_ms",
        "requests_errors",
        "requests_timeouts",
        "connections_num",
        "connections_errors",
        "connections_lost",
        "checks_roundtrip",
        "returns_bad",
    )
    pids = sorted(worker_stats)
    say(
        "checkout wait p50 / p99           "
        + ", ".join(
            f"pid {pid}: {worker_stats[pid].get('requests_wait_p50_ms', 0)} ms / "
            f"{worker_stats[pid].get('requests_wait_p99_ms', 0)} ms"
            for pid in sorted(worker_stats)
        )
        + "  (the pools' histograms)"
    )
    say("pool stats, from GET /pool/stats of each worker:")
    say(f"  {'':<20}" + "".join(f"{'pid ' + str(pid):>12}" for pid in pids))
    for key in keys:
        say(f"  {key:<20}" + "".join(f"{worker_stats[pid].get(key, 0):>12}" for pid in pids))
    for r in failed_after[:5]:
        say(f"  failed after restart: {r.error or r.status} {r.body[:200]!r}")
    ok = not failed_after and restart_done is not None and peak <= cap
    say()
    say(
        "OK: no request started after the restart failed."
        if ok
        else "FAILED: requests started after the restart failed (or the cap was exceeded)."
    )
    return ok


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Ctrl-C (even if the shell started us with SIGINT ignored) and SIGTERM both
    # end the demo through KeyboardInterrupt: the clean-up below runs either way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="geventpool-demo-"))
    cluster = gunicorn = None
    try:
        say("== django-db-geventpool demo ==")
        say("starting a throwaway PostgreSQL ...")
        try:
            cluster = PostgresCluster(settings={"max_connections": "100"})
        except ServerBinariesMissing as exc:
            say(str(exc))
            return 2
        cluster.start()
        say(f"  PostgreSQL on 127.0.0.1:{cluster.port} (data in {cluster.root})")
        say("migrating the example project ...")
        migrate_example(cluster, DATABASE)
        cluster.psql(
            "INSERT INTO shop_product (name, price_cents, sold) "
            "SELECT 'product ' || i, i * 100, 0 FROM generate_series(1, 100) i",
            dbname=DATABASE,
        )
        env = example_env(
            cluster,
            DATABASE,
            MAX_CONNS=str(MAX_CONNS),
            DB_APPLICATION_NAME=APP_NAME,
            POOL_LOG_LEVEL="ERROR",
        )
        say(
            f"starting gunicorn -c gunicorn.conf.py project.wsgi ({WORKERS} gevent workers, "
            f"MAX_CONNS={MAX_CONNS}) ..."
        )
        gunicorn, port = start_gunicorn(env, workdir / "gunicorn.log", workers=WORKERS)
        say(f"  listening on 127.0.0.1:{port}")
        say(
            f"sending {REQUESTS} requests, {CONCURRENCY} at a time, to GET /products/summary; "
            "PostgreSQL restarts halfway ..."
        )

        progress = Progress(REQUESTS)
        halfway = gevent.event.Event()
        restart_done: list[float] = []

        def on_result(result: RequestResult) -> None:
            progress.add(result)
            if progress.done >= max(1, REQUESTS // 2):
                halfway.set()

        def restart_halfway() -> None:
            halfway.wait()
            progress.note = "(restarting PostgreSQL ...)"
            started = monotonic()
            cluster.restart("fast")
            restart_done.append(monotonic())
            progress.note = f"(PostgreSQL restarted in {restart_done[0] - started:.1f}s)"

        sampler = ServerConnections(cluster)
        helpers = [
            gevent.spawn(sampler.run),
            gevent.spawn(restart_halfway),
            gevent.spawn(progress.draw_forever),
        ]
        try:
            load = run_load(
                port,
                "/products/summary",
                requests=REQUESTS,
                concurrency=CONCURRENCY,
                on_result=on_result,
            )
            helpers[1].join()
        finally:
            sampler.stop()
            helpers[0].join(timeout=5)
            gevent.killall(helpers)
        progress.finish()
        worker_stats = fetch_worker_stats(port)
        ok = report(load, restart_done[0] if restart_done else None, sampler.peak, worker_stats)
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("\ninterrupted: cleaning up ...")
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if gunicorn is not None:
            gunicorn.stop()
            gunicorn.kill_group()
        if cluster is not None:
            cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        say("stopped gunicorn and PostgreSQL; removed their files.")


if __name__ == "__main__":
    sys.exit(main())
