"""Errors raised by the pool.

They subclass Django's ``OperationalError`` when Django is importable, so handlers
that already catch database errors keep working; the pool core itself names no
Django module, only this file does.
"""

from typing import TYPE_CHECKING

__all__ = [
    "PoolError",
    "PoolTimeout",
    "PoolClosed",
    "ConnectUnavailable",
    "AllPeersDown",
    "ConnectTimeout",
]

if TYPE_CHECKING:
    from django.db.utils import OperationalError as _OperationalError
else:
    try:
        from django.db.utils import OperationalError as _OperationalError
    except ImportError:  # the pool core is usable (and unit-tested) without Django

        class _OperationalError(Exception):
            """Stand-in base class when Django is not installed."""


class PoolError(_OperationalError):
    """Base class of the errors raised by the pool."""


class PoolTimeout(PoolError, TimeoutError):
    """No connection became available within the pool's timeout."""


class PoolClosed(PoolError):
    """Checkout attempted from a pool that was closed."""


class ConnectUnavailable(PoolError):
    """An opener gave up on opening a connection; the pool treats it as a connect error.

    ``attempted`` is false when no server was tried at all: the pool then counts no
    connect attempt (``connections_num``). Checkouts keep waiting, as for any
    connect error.
    """

    attempted: bool = True


class AllPeersDown(ConnectUnavailable):
    """Every peer of the pool is down and none is due for a retry (see PEERS)."""


class ConnectTimeout(PoolError, TimeoutError):
    """Opening one server connection took longer than its deadline."""
