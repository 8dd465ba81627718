"""Helpers for code that runs outside HTTP requests under the gevent pool.

Django gives connections back at the end of each request (``request_finished``).
Code that runs elsewhere -- a spawned greenlet, a celery task, a management loop --
should wrap its work in `close_connection`, so its connections return to the pool
as soon as it is done instead of when the greenlet ends.

`run_in_native_thread` runs asyncio code (or any blocking call) in a real OS thread.
Under gevent every greenlet of a process shares one OS thread, and asyncio records
"the running event loop" per OS thread. An event loop started in a greenlet
(``asyncio.run()`` in a view or a celery task, a library's background "thread") is
therefore seen by *every* greenlet while it waits, and Django's ``async_unsafe``
guard raises ``SynchronousOnlyOperation`` in their ORM calls. Running the loop in one
of gevent's native worker threads keeps it out of the greenlets' sight, while the
calling greenlet waits cooperatively.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, overload

import gevent

__all__ = ["close_connection", "give_back_connections", "run_in_native_thread"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def give_back_connections() -> None:
    """Give back every connection the current greenlet holds, on every alias.

    Pooled connections go back to their pool; connections of other backends are
    handled as at the end of a request (``CONN_MAX_AGE`` is respected).
    """
    from django.db import connections

    for wrapper in connections.all(initialized_only=True):
        wrapper.close_if_unusable_or_obsolete()


class _CloseConnection:
    """Context manager and decorator; see `close_connection`."""

    def __enter__(self) -> _CloseConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        give_back_connections()

    def __call__(self, func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            finally:
                give_back_connections()

        return wrapper  # type: ignore[return-value]


@overload
def close_connection(func: F) -> F: ...
@overload
def close_connection(func: None = None) -> _CloseConnection: ...


def close_connection(func: Callable[..., Any] | None = None) -> Any:
    """Give back the current greenlet's connections when the wrapped code ends.

    Works as ``@close_connection``, ``@close_connection()`` and
    ``with close_connection():``. The connections are given back whatever happened
    inside (return, exception, ``GreenletExit``).
    """
    if func is None:
        return _CloseConnection()
    if not callable(func):
        raise TypeError(f"close_connection takes a callable or nothing, not {func!r}")
    return _CloseConnection()(func)


def run_in_native_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``func(*args, **kwargs)`` in gevent's native thread pool; return its result.

    Only the calling greenlet waits (other greenlets keep running); an exception
    raised by ``func`` is re-raised here. Typical use:
    ``run_in_native_thread(asyncio.run, main())``. ``func`` must not use the
    Django ORM: database connections belong to greenlets, not to that thread.
    """
    return gevent.get_hub().threadpool.apply(func, args, kwargs)
