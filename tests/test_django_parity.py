"""What Django's own PostgreSQL backend does per connection still happens, pooled.

Every check runs in fresh greenlets (each has its own Django connection object)
and again on a reused server connection. Also run with the PostGIS ENGINE
(``make test-postgis``), where a geometry round trip is added.
"""

from __future__ import annotations

import gevent
import pytest
from django.conf import settings
from django.core.signals import request_finished, request_started
from django.db import ProgrammingError, connection, transaction
from django.db.backends.postgresql.psycopg_any import IsolationLevel, is_psycopg3
from django.db.backends.signals import connection_created

from django_db_geventpool import get_stats
from tests.support.helpers import query, raw_connect, terminate_backend

ROLE = "geventpool_parity_role"


def _in_request(func, *args):
    """Run ``func`` in a new greenlet as one request: check out, work, give back."""

    def request():
        try:
            return func(*args)
        finally:
            connection.close()

    return gevent.spawn(request).get(timeout=30)


def _fetch(sql: str, params=None):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


@pytest.fixture
def database_settings():
    """The default alias's settings dict (restored after the test by ``fresh_pool``)."""
    from django.db import connections

    return connections.settings["default"]


@pytest.fixture
def role():
    observer = raw_connect()
    try:
        if not query(observer, "SELECT 1 FROM pg_roles WHERE rolname = %s", [ROLE]):
            query(observer, f"CREATE ROLE {ROLE} NOLOGIN")
        query(observer, f"GRANT {ROLE} TO CURRENT_USER")
    finally:
        observer.close()
    return ROLE


def test_session_time_zone_on_new_and_reused_connections(configure_pool, database_settings):
    configure_pool(MAX_CONNS=1)
    database_settings["TIME_ZONE"] = "Asia/Tokyo"
    first = _in_request(_fetch, "SELECT pg_backend_pid(), current_setting('TimeZone')")
    second = _in_request(_fetch, "SELECT pg_backend_pid(), current_setting('TimeZone')")
    assert first == second  # same server connection, reused
    assert first[1] == "Asia/Tokyo"
    assert get_stats()["connections_num"] == 1


def test_isolation_level_option(configure_pool):
    configure_pool(MAX_CONNS=1, isolation_level=IsolationLevel.SERIALIZABLE)

    def isolation_inside_atomic():
        with transaction.atomic():
            pid, level = _fetch("SELECT pg_backend_pid(), current_setting('transaction_isolation')")
        return pid, level, connection.isolation_level

    first = _in_request(isolation_inside_atomic)
    second = _in_request(isolation_inside_atomic)
    assert first[0] == second[0]
    assert first[1] == second[1] == "serializable"
    assert first[2] == second[2] == IsolationLevel.SERIALIZABLE


def test_default_isolation_level_is_read_committed(configure_pool):
    configure_pool(MAX_CONNS=1)

    def isolation_inside_atomic():
        with transaction.atomic():
            return _fetch("SELECT current_setting('transaction_isolation')")[0]

    assert _in_request(isolation_inside_atomic) == "read committed"
    assert _in_request(isolation_inside_atomic) == "read committed"


def test_assume_role_on_new_and_reused_connections(configure_pool, role):
    configure_pool(MAX_CONNS=1, assume_role=role)
    first = _in_request(_fetch, "SELECT pg_backend_pid(), current_user, session_user")
    second = _in_request(_fetch, "SELECT pg_backend_pid(), current_user, session_user")
    assert first[0] == second[0]
    assert first[1] == second[1] == role
    assert first[2] != role


def test_session_setup_survives_a_discard_all_reset_query(configure_pool, database_settings, role):
    # DISCARD ALL also resets the role and the time zone: the pool must set them again.
    configure_pool(MAX_CONNS=1, RESET_QUERY="DISCARD ALL", assume_role=role)
    database_settings["TIME_ZONE"] = "America/Sao_Paulo"
    sql = "SELECT pg_backend_pid(), current_user, current_setting('TimeZone')"
    first = _in_request(_fetch, sql)
    second = _in_request(_fetch, sql)
    assert first[0] == second[0]
    assert first[1:] == second[1:] == (role, "America/Sao_Paulo")


def test_connection_created_is_sent_per_checkout(configure_pool):
    configure_pool(MAX_CONNS=1)
    received = []

    def receiver(sender, connection, **kwargs):
        received.append(connection.alias)

    connection_created.connect(receiver)
    try:
        pids = {_in_request(_fetch, "SELECT pg_backend_pid()") for _ in range(3)}
    finally:
        connection_created.disconnect(receiver)
    assert received == ["default"] * 3
    assert len(pids) == 1


def test_conn_health_checks_and_persistent_conn_max_age_are_harmless(
    configure_pool, database_settings
):
    configure_pool(MAX_CONNS=2)
    database_settings["CONN_HEALTH_CHECKS"] = True
    database_settings["CONN_MAX_AGE"] = None

    def django_request():
        request_started.send(sender=None)
        try:
            pid = _fetch("SELECT pg_backend_pid()")[0]
            assert _fetch("SELECT 1") == (1,)
            return pid
        finally:
            request_finished.send(sender=None)

    def run_request():
        return gevent.spawn(django_request).get(timeout=30)

    first = run_request()
    assert get_stats()["pool_available"] == 1  # back in the pool despite CONN_MAX_AGE=None
    assert run_request() == first

    terminate_backend(first)
    assert run_request() != first
    assert get_stats()["requests_errors"] == 0


if is_psycopg3:
    # Server-side prepared statements are a psycopg 3 feature (prepare_threshold).

    def test_prepared_statements_survive_a_discard_all_reset_query(configure_pool):
        configure_pool(
            MAX_CONNS=1, RESET_QUERY="DISCARD ALL", server_side_binding=True, prepare_threshold=1
        )

        def repeated_queries():
            for _ in range(3):
                assert _fetch("SELECT %s::int + 1", [1]) == (2,)
            return _fetch("SELECT pg_backend_pid(), count(*) FROM pg_prepared_statements")

        first = _in_request(repeated_queries)
        if _psycopg_version() < (3, 3, 5):
            # Documented limitation (README, RESET_QUERY): older psycopg keeps using the
            # statements DISCARD ALL dropped. make test-oldest runs this branch.
            with pytest.raises(ProgrammingError, match=r"prepared statement .* does not exist"):
                _in_request(repeated_queries)
            return
        second = _in_request(repeated_queries)
        assert first[0] == second[0]  # reused after DISCARD ALL dropped its statements
        assert first[1] >= 1 and second[1] >= 1  # and prepared again

    def _psycopg_version() -> tuple[int, ...]:
        import psycopg

        return tuple(int(part) for part in psycopg.__version__.split(".")[:3] if part.isdigit())


if "django.contrib.gis" in settings.INSTALLED_APPS:
    # Collected only with the PostGIS settings (make test-postgis).

    @pytest.mark.parametrize("pool_mode", ["session", "transaction"])
    def test_postgis_geometry_saved_and_read_back(configure_pool, pool_mode):
        from django.contrib.gis.geos import Point

        from tests.gisapp.models import Place

        configure_pool(MAX_CONNS=1, POOL_MODE=pool_mode)
        # Transaction mode gives the connection back after each statement.
        held_between = 0 if pool_mode == "transaction" else 1

        def held():
            gevent.sleep(0)  # transaction mode gives back when the greenlet next waits
            stats = get_stats()
            return stats["pool_size"] - stats["pool_available"]

        def save():
            place = Place.objects.create(name="paris", location=Point(2.3522, 48.8566, srid=4326))
            assert held() == held_between
            return place.pk

        def read(pk):
            place = Place.objects.get(pk=pk)
            assert held() == held_between
            distance = (
                Place.objects.filter(location__dwithin=(Point(2.35, 48.85, srid=4326), 0.1))
                .filter(pk=pk)
                .count()
            )
            assert held() == held_between
            return place.location.x, place.location.y, place.location.srid, distance

        pk = _in_request(save)
        for _ in range(2):  # a new connection's adapters, then a reused one's
            x, y, srid, near = _in_request(read, pk)
            assert (round(x, 4), round(y, 4), srid) == (2.3522, 48.8566, 4326)
            assert near == 1
