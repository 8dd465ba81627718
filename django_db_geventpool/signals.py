"""Reconnect signals and hooks, with django-dbconn-retry's signature.

``pre_reconnect`` and ``post_reconnect`` are sent (``sender`` = the wrapper class,
``dbwrapper`` = the wrapper) whenever the pool opens a connection to replace one it
found broken, and around every connect retry. Hooks added with
`add_pre_reconnect_hook` / `add_post_reconnect_hook` run just before the receivers.
A pre-reconnect hook may change ``dbwrapper.settings_dict`` (a new ``PASSWORD`` from
a secrets store, say): connection parameters are read at connect time, so the very
next connect uses it. An exception from a hook or receiver aborts that connect and
reaches the caller; the pool keeps its slots.
"""

from __future__ import annotations

from collections.abc import Callable

from django.db.backends.base.base import BaseDatabaseWrapper
from django.dispatch import Signal

__all__ = [
    "pre_reconnect",
    "post_reconnect",
    "add_pre_reconnect_hook",
    "add_post_reconnect_hook",
    "remove_reconnect_hook",
]

ReconnectHook = Callable[[BaseDatabaseWrapper], None]

pre_reconnect = Signal()
post_reconnect = Signal()

# Process-global like Django's signal receivers: hooks are configuration.
_pre_hooks: list[ReconnectHook] = []
_post_hooks: list[ReconnectHook] = []


def add_pre_reconnect_hook(hook: ReconnectHook) -> None:
    """Run ``hook(dbwrapper)`` before each reconnect (after a broken connection, or a retry)."""
    if hook not in _pre_hooks:
        _pre_hooks.append(hook)


def add_post_reconnect_hook(hook: ReconnectHook) -> None:
    """Run ``hook(dbwrapper)`` after each successful reconnect."""
    if hook not in _post_hooks:
        _post_hooks.append(hook)


def remove_reconnect_hook(hook: ReconnectHook) -> None:
    """Forget ``hook`` (pre or post); no error if it was not added."""
    for hooks in (_pre_hooks, _post_hooks):
        if hook in hooks:
            hooks.remove(hook)


def send_pre_reconnect(dbwrapper: BaseDatabaseWrapper) -> None:
    _notify("pre", _pre_hooks, pre_reconnect, dbwrapper)


def send_post_reconnect(dbwrapper: BaseDatabaseWrapper) -> None:
    _notify("post", _post_hooks, post_reconnect, dbwrapper)


def _notify(
    stage: str, hooks: list[ReconnectHook], signal: Signal, dbwrapper: BaseDatabaseWrapper
) -> None:
    current: object = signal
    try:
        for current in tuple(hooks):
            current(dbwrapper)
        current = signal
        signal.send(sender=type(dbwrapper), dbwrapper=dbwrapper)
    except Exception as exc:
        # The hook's own exception reaches the caller; say where it came from.
        if current is signal:
            source = f"a receiver of the {stage}_reconnect signal"
        else:
            source = f"the {stage}_reconnect hook {current!r}"
        exc.add_note(
            f"django_db_geventpool: raised by {source} for DATABASES[{dbwrapper.alias!r}]; "
            "the connect was abandoned"
        )
        raise
