"""pytest-timeout for a gevent-patched process: a hung test fails with every greenlet's stack.

pytest-timeout's own ``signal`` method raises from the SIGALRM handler in whatever
greenlet happens to run: in a worker greenlet the exception only kills that
greenlet and the test hangs on. Its ``thread`` method runs in a greenlet under
monkey-patching and ends the whole process. Here the alarm is a plain SIGALRM too
(so a test spinning in Python or blocked in a system call is interrupted), but the
failure always lands in the test's own (main) greenlet, carrying the stack of every
live greenlet: the hang is usually in another greenlet (a checkout waiting on a
connection a second greenlet holds).
"""

from __future__ import annotations

import gc
import signal
import traceback
from typing import Any

import gevent
import greenlet
import pytest

__all__ = ["greenlet_stacks", "pytest_timeout_set_timer"]


# Frames of the test runner itself, left out of the stacks shown.
_RUNNER_FRAMES = ("/_pytest/", "/pluggy/", "<frozen runpy>", "/gevent/monkey/", "/pytest/__main__")


def _format(frames: traceback.StackSummary) -> str:
    kept = [f for f in frames if not any(part in f.filename for part in _RUNNER_FRAMES)]
    return "".join(traceback.StackSummary.from_list(kept).format())


def greenlet_stacks(skip_innermost: int = 0) -> str:
    """The current stack of every live greenlet but the hub, as text."""
    hub = gevent.get_hub()
    parts = []
    for obj in gc.get_objects():
        if isinstance(obj, greenlet.greenlet) and obj is not hub and obj.gr_frame is not None:
            parts.append(f"--- greenlet {obj!r}\n{_format(traceback.extract_stack(obj.gr_frame))}")
    current = greenlet.getcurrent()
    if current is not hub:
        # The running greenlet has no gr_frame: its stack is the caller's.
        frames = traceback.extract_stack()[: -1 - skip_innermost]
        parts.append(f"--- greenlet {current!r} (running)\n{_format(frames)}")
    return "\n".join(parts)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool:
    """Arm SIGALRM for this test; on expiry fail the test in its own greenlet."""
    test_greenlet = greenlet.getcurrent()

    def on_alarm(signum: int, frame: object) -> None:
        failure = pytest.fail.Exception(
            f"Timeout: the test ran for more than {settings.timeout}s (pytest-timeout). "
            f"Stacks of the live greenlets:\n{greenlet_stacks(skip_innermost=1)}"
        )
        if greenlet.getcurrent() is test_greenlet:
            raise failure
        # Another greenlet (or the hub) runs now: the test greenlet is parked in a
        # switch. Throw into it from the hub's next callback, as gevent does for
        # KeyboardInterrupt; the running greenlet carries on until it yields.
        gevent.get_hub().loop.run_callback(test_greenlet.throw, failure)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout calls it
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True
