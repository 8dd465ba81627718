"""Wait for something that happens in another greenlet, with a generous bound."""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic

import gevent

__all__ = ["wait_until"]


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.01
) -> None:
    """Yield to the hub until ``predicate()`` is true; fail after ``timeout`` seconds.

    The bound is a safety net against a hanging test, not a speed assertion: it is
    generous (30 s by default) because on a loaded 2-core machine a connect, a
    backend's exit or a server restart can take seconds.
    """
    deadline = monotonic() + timeout
    while not predicate():
        if monotonic() >= deadline:
            raise AssertionError(f"still false after {timeout}s: {predicate!r}")
        gevent.sleep(interval)
