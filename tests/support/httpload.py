"""A small gevent HTTP load generator: N requests at concurrency C, with keep-alive.

Used by the gunicorn test and the demo. Each result records when the request
started, how long it took and what went wrong, so callers can split results at a
moment (for example: the database restart completed).
"""

from __future__ import annotations

import http.client
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic

import gevent

__all__ = ["LoadResult", "RequestResult", "run_load"]


@dataclass(frozen=True)
class RequestResult:
    started: float
    seconds: float
    status: int | None
    error: str | None
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200


@dataclass
class LoadResult:
    results: list[RequestResult] = field(default_factory=list)

    @property
    def failures(self) -> list[RequestResult]:
        return [r for r in self.results if not r.ok]

    def percentile_ms(self, fraction: float) -> float:
        times = sorted(r.seconds for r in self.results)
        if not times:
            return 0.0
        return times[min(len(times) - 1, int(fraction * len(times)))] * 1000


def run_load(
    port: int,
    path: str,
    *,
    requests: int,
    concurrency: int,
    timeout: float = 30.0,
    on_result: Callable[[RequestResult], None] | None = None,
    keep_body: bool = False,
) -> LoadResult:
    """Send ``requests`` GETs to 127.0.0.1:port ``path`` from ``concurrency`` greenlets."""
    load = LoadResult()
    tickets = itertools.count()

    def client() -> None:
        conn: http.client.HTTPConnection | None = None
        try:
            while next(tickets) < requests:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                started = monotonic()
                status = error = None
                body = b""
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    body = response.read()
                    status = response.status
                    if response.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    conn.close()
                    conn = None
                result = RequestResult(
                    started,
                    monotonic() - started,
                    status,
                    error,
                    body if (keep_body or status != 200) else b"",
                )
                load.results.append(result)
                if on_result is not None:
                    on_result(result)
        finally:
            if conn is not None:
                conn.close()

    clients = [gevent.spawn(client) for _ in range(concurrency)]
    try:
        gevent.joinall(clients, raise_error=True)
    finally:
        # Interrupted (Ctrl-C in the demo, a failing test): stop sending.
        gevent.killall(clients)
    return load
