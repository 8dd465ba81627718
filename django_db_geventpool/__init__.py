"""django-db-geventpool: a gevent-cooperative PostgreSQL connection pool for Django.

Importing this package imports no database driver, so it is safe before
``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

from .errors import AllPeersDown, ConnectTimeout, PoolClosed, PoolError, PoolTimeout

__all__ = [
    "AllPeersDown", "ConnectTimeout", "PoolClosed", "PoolError", "PoolTimeout", "get_stats", "__version__",
]

__version__ = "5.0.0"


def get_stats(alias: str = "default") -> dict[str, int]:
    """The pool's counters and live measures for ``alias`` (names as in psycopg_pool).

    Raises ``ValueError`` if ``alias`` does not use a django_db_geventpool ENGINE.
    """
    from django.db import connections

    from .backends.base import PooledDatabaseWrapperMixin

    wrapper = connections[alias]
    if not isinstance(wrapper, PooledDatabaseWrapperMixin):
        raise ValueError(
            f"DATABASES[{alias!r}] uses {wrapper.settings_dict.get('ENGINE')!r}, "
            "not a django_db_geventpool ENGINE"
        )
    pool = wrapper.geventpool
    return pool.get_stats() if pool is not None else {}
