"""RESET_QUERY: session state left by one user does not reach the next one.

With ``MAX_CONNS=1`` every request gets the same server connection (same backend
pid), so whatever a request leaves in its session -- ``SET search_path``, ``SET
statement_timeout``, a temporary table -- is visible to the next request unless
``RESET_QUERY`` (``DISCARD ALL``) wipes it on return. Django's own session set-up
(time zone, ``assume_role``) survives the reset: it is applied again.
"""

import logging

import gevent
import pytest
from django.db import connection, connections

from django_db_geventpool import get_stats

logger = logging.getLogger(__name__)


def _one_request(*statements: str) -> list:
    """Run ``statements`` as one request; the first column of each result."""
    results = []
    try:
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)
                results.append(cursor.fetchone()[0] if cursor.description else None)
    finally:
        connection.close()
    return results


def _leave_session_state() -> int:
    pid, *_ = _one_request(
        "SELECT pg_backend_pid()",
        "CREATE SCHEMA IF NOT EXISTS leaky",
        "SET search_path TO leaky, public",
        "SET statement_timeout = '4321ms'",
        "CREATE TEMPORARY TABLE leftover (x int)",
    )
    return pid


def _next_users_view() -> tuple:
    return tuple(
        _one_request(
            "SELECT pg_backend_pid()",
            "SHOW search_path",
            "SHOW statement_timeout",
            "SELECT to_regclass('pg_temp.leftover') IS NOT NULL",
        )
    )


@pytest.fixture
def leaky_schema():
    yield
    _one_request("DROP SCHEMA IF EXISTS leaky CASCADE")


@pytest.mark.parametrize("reset_query", [None, "DISCARD ALL"], ids=["no-reset", "discard-all"])
def test_session_state_leaks_only_without_reset_query(configure_pool, leaky_schema, reset_query):
    configure_pool(MAX_CONNS=1, RESET_QUERY=reset_query)
    first_pid = _leave_session_state()
    pid, search_path, statement_timeout, temp_table = _next_users_view()
    assert pid == first_pid  # the same server session, reused
    if reset_query is None:
        # What the next user inherits without a reset.
        assert search_path == "leaky, public"
        assert statement_timeout == "4321ms"
        assert temp_table is True
    else:
        assert search_path == '"$user", public'
        assert statement_timeout == "0"
        assert temp_table is False
    assert get_stats()["returns_bad"] == 0
    assert get_stats()["connections_num"] == 1


def test_djangos_session_setup_survives_discard_all(configure_pool, cluster):
    """DISCARD ALL resets the time zone and the role too; the backend sets them again."""
    role = "geventpool_reset_role"
    cluster.psql(
        f"DO $$ BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    settings_dict = connections.settings["default"]
    settings_dict["TIME_ZONE"] = "Asia/Tokyo"
    settings_dict["OPTIONS"]["assume_role"] = role
    configure_pool(MAX_CONNS=1, RESET_QUERY="DISCARD ALL")
    # Fresh greenlets: a wrapper caches its time zone when first used.
    seen = [
        tuple(
            gevent.spawn(
                _one_request, "SELECT pg_backend_pid()", "SHOW TimeZone", "SELECT current_user"
            ).get()
        )
        for _ in range(3)
    ]
    assert len({pid for pid, _, _ in seen}) == 1
    assert {(zone, user) for _, zone, user in seen} == {("Asia/Tokyo", role)}
