"""The process's pools, one per database alias.

Process-global on purpose: every greenlet has its own Django ``DatabaseWrapper``
(Django keeps them in a greenlet-local), and the cap is per process and alias, so
all those wrappers must share one pool. After ``fork()`` the pools themselves
forget their parent's connections (see `ConnectionPool`).
"""

from __future__ import annotations

from collections.abc import Callable

from .pool import ConnectionPool

__all__ = ["created_hooks", "pools"]

pools: dict[str, ConnectionPool] = {}

#: Called with each pool the backend creates, before its first checkout (exporters
#: that need every sample attach their listeners here).
created_hooks: list[Callable[[ConnectionPool], None]] = []
