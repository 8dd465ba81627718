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

from typing import Callable

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
    for hook in tuple(_pre_hooks):
        hook(dbwrapper)
    pre_reconnect.send(sender=type(dbwrapper), dbwrapper=dbwrapper)


def send_post_reconnect(dbwrapper: BaseDatabaseWrapper) -> None:
    for hook in tuple(_post_hooks):
        hook(dbwrapper)
    post_reconnect.send(sender=type(dbwrapper), dbwrapper=dbwrapper)
