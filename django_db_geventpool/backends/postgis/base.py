"""GeoDjango's PostGIS backend, served from the gevent pool, with either driver.

The driver is the one Django's PostgreSQL backend loaded (psycopg 3 when it is
importable). PostGIS adapters are registered on every new server connection by
GeoDjango's own ``get_new_connection``.
"""

from django.contrib.gis.db.backends.postgis.base import DatabaseWrapper as PostGISDatabaseWrapper

from ...checks import register as register_checks
from ..base import PooledDatabaseWrapperMixin

# The system checks (checks.py), for projects that only set ENGINE. checks.py imports
# the glue, not this module: no import cycle.
register_checks()


class DatabaseWrapper(PooledDatabaseWrapperMixin, PostGISDatabaseWrapper):
    """PostGIS, pooled."""
