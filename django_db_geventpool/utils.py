"""Give back the connections of greenlets that are not HTTP requests.

Django gives connections back at the end of each request (``request_finished``).
Code that runs elsewhere -- a spawned greenlet, a celery task, a management loop --
should wrap its work in `close_connection`, so its connections return to the pool
as soon as it is done instead of when the greenlet ends.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, overload

__all__ = ["close_connection", "give_back_connections"]

F = TypeVar("F", bound=Callable[..., Any])


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
