"""Run asyncio code (or any blocking call) in a real OS thread, away from the greenlets.

Under gevent every greenlet of a process shares one OS thread, and asyncio records
"the running event loop" per OS thread. An event loop started in a greenlet
(``asyncio.run()`` in a view or a celery task, a library's background "thread")
is therefore seen by *every* greenlet while it waits, and Django's ``async_unsafe``
guard raises ``SynchronousOnlyOperation`` in their ORM calls. Running the loop in
one of gevent's native worker threads keeps it out of the greenlets' sight, while
the calling greenlet waits cooperatively.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import gevent

__all__ = ["run_in_native_thread"]

T = TypeVar("T")


def run_in_native_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``func(*args, **kwargs)`` in gevent's native thread pool; return its result.

    Only the calling greenlet waits (other greenlets keep running); an exception
    raised by ``func`` is re-raised here. Typical use:
    ``run_in_native_thread(asyncio.run, main())``. ``func`` must not use the
    Django ORM: database connections belong to greenlets, not to that thread.
    """
    return gevent.get_hub().threadpool.apply(func, args, kwargs)
