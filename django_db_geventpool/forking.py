"""What a forked child does with the pool state it inherited: one hook, one order.

After ``fork()`` the child has copies of every pool, peer set and Django wrapper of
its parent, pointing at sockets the parent still uses. The child must forget them
without touching them. `_after_fork_in_child` (the only ``os.register_at_fork`` hook
of the package) does it in this order:

1. **Pools** (`ConnectionPool.forget_after_fork`): each pool drops its idle and
   in-use connections, waiters, connectors and backoff state; the driver objects of
   those connections are handed to `keep_inherited_alive`. The parent's greenlets
   that were busy with the pool at fork time go on in the child; a new pool
   generation makes them leave the child's pool alone when they resume (the
   connection one of them held goes to `keep_inherited_alive` then).
2. **Peer sets** (`PeerSet.forget_after_fork`): the per-peer counts of open and
   opening connections start again from zero (the pools no longer hold any); a peer
   left "probing" by a connect of the parent would otherwise never be retried.
3. **Callbacks** registered with `on_fork_in_child`, in registration order: the
   Django glue registers one that makes the wrappers of the forking greenlet stop
   pointing at their inherited connection. It runs last, when the pools no longer
   own those connections. (The pool core imports no Django: the glue registers
   itself here, this module knows nothing of it.)

Keeping the inherited driver objects alive: the child must neither send on the
inherited sockets nor close them politely (a Terminate message would end the
parent's session), so each descriptor is first pointed at ``/dev/null``. The driver
object itself is never closed nor freed: closing it (or freeing it, which closes
it) takes the driver's connection lock, which a greenlet of the parent may have
held at fork time, and the child would hang before it could ``exec`` (psycopg2,
any ``subprocess`` call made while queries run). So the objects stay referenced
for the child's lifetime, and on CPython one extra reference that is never
dropped keeps even the interpreter's shutdown from freeing them. Other
interpreters (PyPy) have no ``Py_IncRef``: there only the list keeps them alive,
which covers the child's life but not its final garbage collection.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .peerset import PeerSet
    from .pool import ConnectionPool

__all__ = ["keep_inherited_alive", "on_fork_in_child", "track_peer_set", "track_pool"]

logger = logging.getLogger(__name__)

# Process-global on purpose: a fork copies the whole process, so what the child
# must forget is every pool and peer set of the process, whoever created them.
_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
_peer_sets: weakref.WeakSet[PeerSet] = weakref.WeakSet()
_callbacks: list[Callable[[], None]] = []

# Driver connections a forked child inherited, their sockets now /dev/null: kept
# referenced for the child's lifetime so that they are never closed or freed.
# A few objects and /dev/null descriptors per fork.
_inherited: list[Any] = []

_CPYTHON = sys.implementation.name == "cpython"


def track_pool(pool: ConnectionPool) -> None:
    """Make a forked child forget ``pool``'s connections (step 1)."""
    _pools.add(pool)


def track_peer_set(peer_set: PeerSet) -> None:
    """Make a forked child reset ``peer_set``'s counts (step 2)."""
    _peer_sets.add(peer_set)


def on_fork_in_child(callback: Callable[[], None]) -> None:
    """Call ``callback()`` in every forked child, after the pools and peer sets (step 3)."""
    if callback not in _callbacks:
        _callbacks.append(callback)


def keep_inherited_alive(raw: Any, fileno: int | None) -> None:
    """Point an inherited connection's socket at /dev/null and never close or free it.

    ``fileno`` is the descriptor of ``raw``'s socket, or None if the driver could
    not tell (the object is kept alive all the same).
    """
    if fileno is not None:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, fileno)
        except OSError as exc:
            logger.debug("after fork: could not detach descriptor %d: %s", fileno, exc)
        finally:
            os.close(devnull)
    _inherited.append(raw)
    if _CPYTHON:
        # One reference that is never dropped, so not even the interpreter's
        # shutdown frees (and thereby closes) it.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(raw))


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool.forget_after_fork()
    for peer_set in list(_peer_sets):
        peer_set.forget_after_fork()
    for callback in list(_callbacks):
        callback()


os.register_at_fork(after_in_child=_after_fork_in_child)
