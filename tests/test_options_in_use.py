"""Pool options in use: a bad value fails the first query; pool options never reach libpq."""

from __future__ import annotations

from unittest import mock

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.backends.postgresql.base import DatabaseWrapper as DjangoPostgreSQLWrapper

from django_db_geventpool import get_stats
from django_db_geventpool.backends.options import POOL_OPTION_NAMES


def test_bad_option_surfaces_at_the_first_query(configure_pool):
    configure_pool(POOL_TIMEOUT="soon")
    with pytest.raises(
        ImproperlyConfigured, match=r"DATABASES\['default'\]\['OPTIONS'\]\['POOL_TIMEOUT'\]"
    ):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")


def test_djangos_pool_option_surfaces_at_the_first_query(configure_pool):
    configure_pool(pool=True)
    with pytest.raises(ImproperlyConfigured, match="'pool'"):
        connection.ensure_connection()


def test_pool_options_never_reach_the_driver(configure_pool):
    configure_pool(
        MAX_CONNS=3,
        REUSE_CONNS=2,
        POOL_TIMEOUT=5,
        HEALTH_CHECK_DELAY=None,
        MAX_LIFETIME=60,
        MAX_IDLE=30,
        LEAK_TIMEOUT=60,
        CONNECT_RETRIES=2,
        CONNECT_RETRY_DELAY=0.2,
        RESET_QUERY="DISCARD ALL",
        CHECK_INTERVAL=10,
    )
    seen: list[dict] = []
    real = DjangoPostgreSQLWrapper.get_new_connection

    def spy(self, conn_params):
        seen.append(dict(conn_params))
        return real(self, conn_params)

    with mock.patch.object(DjangoPostgreSQLWrapper, "get_new_connection", spy):
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('application_name')")
            assert cursor.fetchone() == ("geventpool-test",)  # driver options still pass
    connection.close()
    assert len(seen) == 1
    assert not set(seen[0]) & set(POOL_OPTION_NAMES)
    assert not set(connection.get_connection_params()) & set(POOL_OPTION_NAMES)
    assert get_stats()["pool_max"] == 3
