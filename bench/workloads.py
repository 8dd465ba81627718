"""The workloads, run inside one reference's process (gevent already patched).

Each function drives a `bench.references` client from gevent greenlets, as a
gevent web worker would (every request in a ``Greenlet``), and returns plain
dicts that go to JSON. Nothing here asserts on time: the report compares.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from time import perf_counter, process_time
from typing import Any

import gevent
from gevent.event import Event

__all__ = [
    "Sizes",
    "Sampler",
    "FifoFloor",
    "checkout_overhead",
    "throughput",
    "external_wait",
    "waiting_scale",
    "rss_mb",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sizes:
    """How much work each workload does (the smoke test uses tiny ones)."""

    overhead_n: int = 1000
    concurrency: tuple[int, ...] = (1, 10, 50, 200, 1000)
    queries: tuple[int, ...] = (1, 5)
    duration: float = 0.4
    warmup: float = 0.15
    waiters: tuple[int, ...] = (10, 1000, 5000)
    waiting_checkouts: int = 5000
    # "Requests with an external wait": a query, gevent.sleep(W), a query.
    wait_ms: tuple[int, ...] = (5, 20, 50)
    wait_concurrency: tuple[int, ...] = (200, 1000)
    wait_duration: float = 1.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


class Sampler:
    """Peak server connections of one application_name, and peak RSS, every few ms."""

    def __init__(self, conn: Any, application_name: str, interval: float = 0.02) -> None:
        self._conn = conn
        self._name = application_name
        self.interval = interval
        self.peak_conns = 0
        self.peak_rss = 0.0
        self._greenlet = gevent.spawn(self._run)

    def count(self) -> int:
        with self._conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self._name,)
            )
            return cursor.fetchone()[0]

    def reset(self) -> None:
        self.peak_conns = 0
        self.peak_rss = 0.0

    def _run(self) -> None:
        while True:
            self.peak_conns = max(self.peak_conns, self.count())
            self.peak_rss = max(self.peak_rss, rss_mb())
            gevent.sleep(self.interval)

    def stop(self) -> None:
        self._greenlet.kill()


def _in_greenlet(func, *args):
    # Requests run in gevent Greenlets in a gevent web worker; so do the loops here.
    return gevent.spawn(func, *args).get()


def checkout_overhead(client, n: int, time_budget: float = 3.0) -> dict[str, float]:
    """µs per checkout + query + return, minus the same query on a held connection.

    The two are measured in alternating blocks, and the overhead is the median
    of the per-block differences, so a slow moment of a shared machine hits both
    sides of a difference alike. ``checkout_us`` is checkout + return alone.
    Each figure in wall time and (``cpu_`` keys) in CPU time of this process: the
    CPU figures leave out the server's side of a round trip, and whatever else
    the machine is running.
    """
    block = max(1, min(50, n // 10))
    blocks = max(3, n // block)

    def held() -> tuple[float, float]:
        handle = client.acquire()
        query = client.query
        wall, cpu = perf_counter(), process_time()
        for _ in range(block):
            query(handle)
        wall, cpu = perf_counter() - wall, process_time() - cpu
        client.release(handle)
        return wall / block, cpu / block

    def cycle(with_query: bool = True) -> tuple[float, float]:
        acquire, query, release = client.acquire, client.query, client.release
        wall, cpu = perf_counter(), process_time()
        for _ in range(block):
            handle = acquire()
            if with_query:
                query(handle)
            release(handle)
        return (perf_counter() - wall) / block, (process_time() - cpu) / block

    def measure() -> dict[str, float]:
        cycle()  # warm up: connections opened, code paths hot
        samples: dict[str, list[float]] = {}
        deadline = perf_counter() + time_budget
        for i in range(blocks):
            if i >= 3 and perf_counter() > deadline:
                break  # a connection per checkout (no_pool): enough blocks for a median
            if i % 2:
                c, h = cycle(), held()
            else:
                h, c = held(), cycle()
            b = cycle(with_query=False)
            for k, clock in enumerate(("", "cpu_")):
                for name, value in (
                    ("held_us", h[k]),
                    ("cycle_us", c[k]),
                    ("overhead_us", c[k] - h[k]),
                    ("checkout_us", b[k]),
                ):
                    samples.setdefault(clock + name, []).append(value * 1e6)
        return {name: statistics.median(values) for name, values in samples.items()}

    return _in_greenlet(measure)


def throughput(
    client,
    concurrency: int,
    queries: tuple[int, ...],
    duration: float,
    warmup: float,
    sampler: Sampler | None,
    max_window: float = 3.0,
    wait: float = 0.0,
) -> list[dict[str, Any]]:
    """``concurrency`` greenlets making requests of ``q`` queries for ``duration`` s, per q.

    With ``wait`` > 0 each request also waits ``wait`` seconds (``gevent.sleep``,
    standing for a call to another service) between consecutive queries.

    The same greenlets serve the warm-up and every measured run, so connections
    held per greenlet (orm_held) are opened once. A run counts the requests that
    completed inside its window; at the end of the window the greenlets finish
    what they are doing (a greenlet that gets its connection after the end gives
    it back without querying) before the next run starts.
    """
    phases = [(queries[0], warmup)] + [(q, duration) for q in queries]
    state = {"stop": False}
    go = [Event() for _ in phases]
    done = [Event() for _ in phases]
    finished = [0] * len(phases)
    latencies: list[list[float]] = [[] for _ in phases]
    errors = [0] * len(phases)
    served = [0] * len(phases)  # greenlets that completed a request inside the window

    def worker() -> None:
        client.prepare()
        acquire, query, release = client.acquire, client.query, client.release
        sleep = gevent.sleep
        try:
            for phase, (count, _) in enumerate(phases):
                go[phase].wait()
                record = latencies[phase].append
                mine = 0
                while not state["stop"]:
                    started = perf_counter()
                    try:
                        handle = acquire()
                        try:
                            if state["stop"]:
                                continue
                            for i in range(count):
                                if wait and i:
                                    sleep(wait)
                                query(handle)
                        finally:
                            release(handle)
                    except Exception:
                        errors[phase] += 1
                        gevent.sleep(0.001)
                        continue
                    if not state["stop"]:
                        record(perf_counter() - started)
                        mine += 1
                served[phase] += mine > 0
                finished[phase] += 1
                if finished[phase] == concurrency:
                    done[phase].set()
        finally:
            client.finish()

    workers = [gevent.spawn(worker) for _ in range(concurrency)]
    gevent.sleep(0)
    rows = []
    for phase, (count, length) in enumerate(phases):
        state["stop"] = False
        if sampler is not None:
            sampler.reset()
        started, cpu_started = perf_counter(), process_time()
        go[phase].set()
        gevent.sleep(length)
        # Without a cap, a request at 1,000 greenlets can take longer than the
        # window (1,000 queries or connects at once): keep the window open until
        # about one request per greenlet has completed, within reason.
        while len(latencies[phase]) < concurrency and perf_counter() - started < max_window:
            gevent.sleep(0.02)
        state["stop"] = True
        window, cpu = perf_counter() - started, process_time() - cpu_started
        done[phase].wait()
        if phase == 0:
            continue  # the warm-up
        ordered = sorted(latencies[phase])
        rows.append(
            {
                "concurrency": concurrency,
                "queries": count,
                "wait_ms": wait * 1e3,
                "requests": len(ordered),
                "rps": len(ordered) / window,
                "p50_ms": _percentile(ordered, 0.50) * 1e3,
                "p99_ms": _percentile(ordered, 0.99) * 1e3,
                # The process's CPU time per request: with a cap of 10 connections the
                # benchmark process itself is often the bottleneck on 2 cores.
                "cpu_us_per_request": cpu / len(ordered) * 1e6 if ordered else None,
                "errors": errors[phase],
                # Latencies are those of completed requests: a queue that lets some
                # greenlets starve looks fast unless one also counts who was served.
                "served_greenlets": served[phase],
                "peak_conns": sampler.peak_conns if sampler else None,
                "peak_rss_mb": sampler.peak_rss if sampler else None,
            }
        )
    gevent.joinall(workers)
    return rows


def external_wait(
    client, concurrency: int, wait_ms: int, duration: float, warmup: float, sampler: Sampler | None
) -> dict[str, Any]:
    """Requests of one ORM query, ``gevent.sleep(wait_ms)``, one more ORM query.

    The wait stands for what real requests wait on besides the database (an
    HTTP API, Redis, S3): a pool that holds the connection through it serves at
    most ``MAX_CONNS`` such requests at once.
    """
    # Room for at least a few requests per greenlet beyond the first one.
    window = max(duration, 4 * wait_ms / 1e3)
    rows = throughput(
        client,
        concurrency,
        (2,),
        window,
        warmup,
        sampler,
        max_window=window + 3.0,
        wait=wait_ms / 1e3,
    )
    return rows[0]


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def waiting_scale(client, waiters: int, max_conns: int, checkouts: int) -> dict[str, Any]:
    """µs per checkout + return while about ``waiters`` greenlets queue on the cap.

    ``waiters + max_conns`` greenlets each loop over checkout, a yield while
    holding (so the others queue up), return; the queue stays about ``waiters``
    long. No query: the cost measured is the pool's and the hub's. Only the
    steady state is timed: ``checkouts`` checkouts after every greenlet has had
    one, so starting and ending greenlets is not counted. Wall time, and the CPU
    time of this process (what the pool and the hub cost, whatever else the
    machine is doing; without I/O, as here with ``ours``, they are the same work).
    """
    size = waiters + max_conns
    start_at, end_at = size, size + checkouts
    go = Event()
    state = {
        "count": 0,
        "started": 0.0,
        "elapsed": 0.0,
        "cpu_started": 0.0,
        "cpu": 0.0,
        "stop": False,
        "errors": 0,
    }

    def worker() -> None:
        client.prepare()
        acquire, release, sleep = client.acquire, client.release, gevent.sleep
        go.wait()
        try:
            while not state["stop"]:
                try:
                    handle = acquire()
                except Exception:
                    state["errors"] += 1
                    sleep(0.001)  # as in throughput(): never spin without yielding
                    continue
                sleep(0)
                release(handle)
                state["count"] += 1
                if state["count"] == start_at:
                    state["started"] = perf_counter()
                    state["cpu_started"] = process_time()
                elif state["count"] == end_at:
                    state["elapsed"] = perf_counter() - state["started"]
                    state["cpu"] = process_time() - state["cpu_started"]
                    state["stop"] = True
        finally:
            client.finish()

    workers = [gevent.spawn(worker) for _ in range(size)]
    gevent.sleep(0)  # every greenlet has its wrapper and waits for the start
    go.set()
    gevent.joinall(workers)
    return {
        "waiters": waiters,
        "checkouts": checkouts,
        "us_per_checkout": state["elapsed"] / checkouts * 1e6,
        "cpu_us_per_checkout": state["cpu"] / checkouts * 1e6,
        "errors": state["errors"],
    }


# How reports name `FifoFloor`'s figures.
FLOOR = "gevent FIFO floor"


class FifoFloor:
    """The least any first-come-first-served pool must do: a slot count and a queue
    of gevent hub ``Waiter`` objects, woken from the hub. No connections, no Django.

    Run through `waiting_scale`, it shows what serving waiters in order costs the
    hub itself as the queue grows (each hand-over wakes the greenlet that has
    waited longest, whose memory is the coldest).
    """

    def __init__(self, size: int) -> None:
        from collections import deque

        from gevent.hub import Waiter, get_hub

        self._free = size
        self._queue: deque = deque()
        self._waiter = Waiter
        self._loop = get_hub().loop

    def prepare(self) -> None:
        pass

    def acquire(self) -> None:
        if self._free and not self._queue:
            self._free -= 1
            return
        waiter = self._waiter()
        self._queue.append(waiter)
        waiter.get()

    def release(self, handle: None) -> None:
        if self._queue:
            self._loop.run_callback(self._queue.popleft().switch, None)
        else:
            self._free += 1

    def finish(self) -> None:
        pass
