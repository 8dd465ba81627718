"""Django's PostgreSQL backend on psycopg 3, served from the gevent pool."""

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from ...checks import register as register_checks
from ..base import PooledDatabaseWrapperMixin

# The system checks (checks.py), for projects that only set ENGINE. checks.py imports
# the glue, not this module: no import cycle.
register_checks()

if not is_psycopg3:
    raise ImproperlyConfigured(
        "ENGINE 'django_db_geventpool.backends.postgresql_psycopg3' needs psycopg 3, but "
        "Django loaded psycopg2 because psycopg is not importable. Install it "
        "(pip install 'django-db-geventpool[psycopg3]') or use ENGINE "
        "'django_db_geventpool.backends.postgresql_psycopg2'."
    )


class DatabaseWrapper(PooledDatabaseWrapperMixin, PostgreSQLDatabaseWrapper):
    """PostgreSQL with psycopg 3, pooled."""
