"""Django's PostgreSQL backend on psycopg2 (+psycogreen), served from the gevent pool."""

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from ...checks import register as register_checks
from ..base import PooledDatabaseWrapperMixin

# The system checks (checks.py), for projects that only set ENGINE. checks.py imports
# the glue, not this module: no import cycle.
register_checks()

if is_psycopg3:
    # Django's backend picks psycopg 3 whenever it is importable; running it with
    # psycopg2 options would fail at the first connect ("invalid connection option
    # 'context'"), so say so now.
    raise ImproperlyConfigured(
        "ENGINE 'django_db_geventpool.backends.postgresql_psycopg2' needs psycopg2, but "
        "psycopg 3 is installed and Django's PostgreSQL backend always loads it in that "
        "case. Use ENGINE 'django_db_geventpool.backends.postgresql_psycopg3', or "
        "uninstall psycopg (pip uninstall psycopg psycopg-binary)."
    )


class DatabaseWrapper(PooledDatabaseWrapperMixin, PostgreSQLDatabaseWrapper):
    """PostgreSQL with psycopg2, pooled; psycogreen's wait callback is installed if missing."""
