"""GeoDjango's PostGIS backend, served from the gevent pool, with either driver.

The driver is the one Django's PostgreSQL backend loaded (psycopg 3 when it is
importable). PostGIS adapters are registered on every new server connection by
GeoDjango's own ``get_new_connection``.
"""

from django.contrib.gis.db.backends.postgis.base import DatabaseWrapper as PostGISDatabaseWrapper

from ..base import PooledDatabaseWrapperMixin


class DatabaseWrapper(PooledDatabaseWrapperMixin, PostGISDatabaseWrapper):
    """PostGIS, pooled."""
