"""A steady stream of short "requests" from many greenlets, with every outcome recorded.

Fault tests start a `Load`, break something (a proxy restart, a password
rotation), note when the service is back, and then check that no request that
*started* after that moment failed.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from time import monotonic

import gevent
from django.db import connections

__all__ = ["Load", "Outcome"]

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One request: when it started and ended, and its error (None if it succeeded)."""

    started: float
    ended: float
    error: BaseException | None


class Load:
    """``concurrency`` greenlets each running ``sql`` on ``alias`` as one request, in a loop.

    Each request checks a connection out, runs one query and gives it back, as a
    Django request does; ``pause`` seconds separate a greenlet's requests.
    """

    def __init__(
        self,
        alias: str = "default",
        concurrency: int = 8,
        sql: str = "SELECT 1",
        pause: float = 0.005,
    ) -> None:
        self.alias = alias
        self.concurrency = concurrency
        self.sql = sql
        self.pause = pause
        self.outcomes: list[Outcome] = []
        self._greenlets: list[gevent.Greenlet] = []
        self._running = False

    def _request(self) -> None:
        wrapper = connections[self.alias]
        started = monotonic()
        error: BaseException | None = None
        try:
            with wrapper.cursor() as cursor:
                cursor.execute(self.sql)
                cursor.fetchall()
        except Exception as exc:
            error = exc
        finally:
            # The end of a request: the connection goes back to the pool.
            try:
                wrapper.close()
            except Exception as exc:
                error = error or exc
        self.outcomes.append(Outcome(started, monotonic(), error))

    def _loop(self) -> None:
        while self._running:
            self._request()
            gevent.sleep(self.pause)

    def start(self) -> Load:
        self._running = True
        self._greenlets = [gevent.spawn(self._loop) for _ in range(self.concurrency)]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """End the load; fail if a request is still running ``timeout`` seconds later.

        A request that outlives the load is a hang (a checkout or query that never
        returns): the failure carries the stuck greenlets' stacks, then they are killed.
        """
        self._running = False
        gevent.joinall(self._greenlets, timeout=timeout)
        stuck = [greenlet for greenlet in self._greenlets if not greenlet.dead]
        if stuck:
            stacks = "\n".join(
                "".join(traceback.format_stack(greenlet.gr_frame))
                for greenlet in stuck
                if greenlet.gr_frame is not None
            )
            gevent.killall(stuck, timeout=5)
            raise AssertionError(
                f"{len(stuck)} of {len(self._greenlets)} load greenlets still in a request "
                f"{timeout}s after stop():\n{stacks}"
            )
        for greenlet in self._greenlets:
            if greenlet.exception is not None:
                raise greenlet.exception

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_requests(
        self, count: int, since: float | None = None, timeout: float = 60.0
    ) -> None:
        """Let the load run until ``count`` requests that started after ``since`` ended."""
        deadline = monotonic() + timeout
        since = monotonic() if since is None else since
        while len(self.started_after(since)) < count:
            if monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} requests completed in {timeout}s")
            gevent.sleep(0.01)

    def started_after(self, moment: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= moment]

    def failures(self, since: float = 0.0) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None and o.started >= since]

    def error_summary(self, since: float = 0.0) -> dict[str, int]:
        """How many requests failed with each error message (first line)."""
        summary: dict[str, int] = {}
        for outcome in self.failures(since):
            lines = str(outcome.error).strip().splitlines() or [""]
            text = f"{type(outcome.error).__name__}: {lines[0]}"
            summary[text] = summary.get(text, 0) + 1
        return summary
