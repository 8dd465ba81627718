"""django-db-geventpool: a gevent-cooperative PostgreSQL connection pool for Django.

Importing this package imports no database driver, so it is safe before
``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import AllPeersDown, ConnectTimeout, PoolClosed, PoolError, PoolTimeout

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = [
    "AllPeersDown",
    "ConnectTimeout",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "drain",
    "get_stats",
    "resize",
    "__version__",
]

__version__ = "5.0.0"


def get_stats(alias: str = "default") -> dict[str, int]:
    """The pool's counters and live measures for ``alias`` (names as in psycopg_pool).

    Raises ``ValueError`` if ``alias`` does not use a django_db_geventpool ENGINE.
    """
    pool = _pool(alias)
    return pool.get_stats() if pool is not None else {}


def drain(alias: str = "default") -> int:
    """Close ``alias``'s idle connections now and those in use when they are returned.

    The next checkouts open fresh connections, with the connection parameters of
    that moment: use it after rotating credentials, for a planned failover or a DNS
    change. Acts on this process's pool only (see ``manage.py geventpool`` for the
    processes of a gunicorn server). Returns how many idle connections were closed.
    Raises ``ValueError`` if ``alias`` does not use a django_db_geventpool ENGINE.
    """
    pool = _pool(alias)
    return pool.drain() if pool is not None else 0


def resize(alias: str, max_conns: int) -> None:
    """Change ``alias``'s cap (``MAX_CONNS``) in this process, now.

    Growing serves queued checkouts at once; shrinking closes idle connections
    beyond the new cap and drops connections in use as they are returned, never
    interrupting a holder. Lasts until the process ends or the pool is recreated.
    Raises ``ValueError`` for a non-pooled alias or ``max_conns`` < 1.
    """
    if isinstance(max_conns, bool) or not isinstance(max_conns, int) or max_conns < 1:
        raise ValueError(f"max_conns must be an int of at least 1, not {max_conns!r}")
    pool = _pool(alias)
    if pool is not None:
        pool.resize(max_conns)


def _pool(alias: str) -> ConnectionPool | None:
    """``alias``'s pool (created if needed, without I/O); ValueError for a non-pooled alias."""
    from django.db import connections

    from .backends.base import PooledDatabaseWrapperMixin

    wrapper = connections[alias]
    if not isinstance(wrapper, PooledDatabaseWrapperMixin):
        raise ValueError(
            f"DATABASES[{alias!r}] uses {wrapper.settings_dict.get('ENGINE')!r}, "
            "not a django_db_geventpool ENGINE"
        )
    return wrapper.geventpool
