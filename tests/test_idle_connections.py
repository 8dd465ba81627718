"""Idle connections: left alone when another one comes back broken, closed by the sweeper.

The old package closed every idle connection of the pool when one connection was
found closed on return. Here a connection given back broken is closed alone; the
idle ones keep their server sessions and serve the next requests.

Idle connections past ``MAX_IDLE`` or ``MAX_LIFETIME`` are closed by the pool's
background sweeper even when no request comes to find them (its period is half
the smallest of the two limits, at least 0.25 s: see ``ConnectionPool._maintenance_interval``).
"""

from __future__ import annotations

import gevent
import pytest
from django.db import OperationalError, connection
from gevent.event import Event

from django_db_geventpool import get_stats
from tests.support.eventually import wait_until
from tests.support.helpers import backend_pid, pool_pids, query, raw_connect


def _concurrent_pids(count: int) -> list[int]:
    """``count`` requests holding a connection at once; each one's backend pid.

    Every request keeps its connection until all of them have one, so they are
    ``count`` different connections.
    """
    all_in = Event()
    pids: list[int] = []

    def request() -> int:
        try:
            pid = backend_pid()
            pids.append(pid)
            if len(pids) == count:
                all_in.set()
            all_in.wait(30)
            return pid
        finally:
            connection.close()

    greenlets = [gevent.spawn(request) for _ in range(count)]
    gevent.joinall(greenlets, raise_error=True)
    return [g.value for g in greenlets]


def test_a_connection_returned_broken_leaves_the_other_idle_connections_alone(configure_pool):
    configure_pool(MAX_CONNS=4)
    pooled = _concurrent_pids(4)
    assert len(set(pooled)) == 4
    assert get_stats()["pool_available"] == 4

    observer = raw_connect()
    try:
        # One request: its backend is terminated while it holds the connection,
        # its next query fails, and the request ends the way Django ends one.
        pid = backend_pid()
        assert pid in pooled
        query(observer, "SELECT pg_terminate_backend(%s, 5000)", [pid])
        with pytest.raises(OperationalError):
            backend_pid()
        connection.close_if_unusable_or_obsolete()
        assert connection.connection is None

        others = set(pooled) - {pid}
        stats = get_stats()
        assert stats["returns_bad"] == 1
        assert stats["pool_available"] == 3
        assert stats["pool_size"] == 3
        # Their server sessions are still there, idle.
        assert others <= pool_pids(observer, "idle")
        assert pid not in pool_pids(observer)

        # The next three requests at once are served by exactly those connections.
        assert sorted(_concurrent_pids(3)) == sorted(others)
    finally:
        observer.close()
    stats = get_stats()
    assert stats["connections_num"] == 4  # nothing reopened
    assert stats["connections_lost"] == 0
    assert stats["requests_errors"] == 0


@pytest.mark.parametrize(
    "options",
    [
        # Sweeper period: max(min(MAX_IDLE, MAX_LIFETIME) / 2, 0.5 s) = 0.5 s.
        pytest.param({"MAX_IDLE": 0.5}, id="max_idle"),
        # MAX_IDLE far away: only the lifetime (0.9 to 1.0 s, jittered) can expire them.
        pytest.param({"MAX_IDLE": 60.0, "MAX_LIFETIME": 1.0}, id="max_lifetime"),
    ],
)
def test_the_sweeper_closes_expired_idle_connections_without_traffic(configure_pool, options):
    configure_pool(MAX_CONNS=4, **options)
    # Connected first: a connect that runs late on a loaded machine must not let the
    # sweeper close the connections before the test has seen them open.
    observer = raw_connect()
    try:
        pids = set(_concurrent_pids(2))
        assert len(pids) == 2
        assert pids <= pool_pids(observer)
        # No request from here on: only the sweeper can close them.
        wait_until(lambda: not pids & pool_pids(observer))
    finally:
        observer.close()
    stats = get_stats()
    assert stats["pool_size"] == 0
    assert stats["pool_available"] == 0
    assert stats["connections_expired"] == 2
    assert stats["requests_num"] == 2  # no checkout found them expired


@pytest.mark.parametrize("reuse", [0, 1, 3])
def test_reuse_conns_keeps_that_many_server_sessions_idle(configure_pool, reuse):
    configure_pool(MAX_CONNS=4, REUSE_CONNS=reuse, HEALTH_CHECK_DELAY=None)
    opened = set(_concurrent_pids(4))
    assert len(opened) == 4
    observer = raw_connect()
    try:
        # The connections beyond REUSE_CONNS were closed on return: their backends end.
        wait_until(lambda: len(pool_pids(observer)) == reuse)
        kept = pool_pids(observer)
        assert kept <= opened
        stats = get_stats()
        assert stats["pool_size"] == stats["pool_available"] == reuse
        # The next requests are served by the kept sessions, without a connect.
        if reuse:
            assert set(_concurrent_pids(reuse)) == kept
        assert get_stats()["connections_num"] == 4
    finally:
        observer.close()


def test_a_changed_user_closes_the_old_users_idle_connections(cluster, configure_pool):
    """docs/operations.md: with dynamic credentials, the old user's idle connections close."""
    cluster.psql(
        "DO $$ BEGIN CREATE ROLE geventpool_rotated LOGIN; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    configure_pool(MAX_CONNS=2)
    old_pid = backend_pid()
    connection.close()
    assert get_stats()["pool_available"] == 1
    # What a reconnect hook does when the secrets store hands out a new user.
    connection.settings_dict["USER"] = "geventpool_rotated"  # restored after the test

    def whoami() -> tuple[str, int]:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT current_user, pg_backend_pid()")
                return cursor.fetchone()
        finally:
            connection.close()

    user, pid = gevent.spawn(whoami).get(timeout=30)
    assert user == "geventpool_rotated"
    assert pid != old_pid
    observer = raw_connect()
    try:
        wait_until(lambda: old_pid not in pool_pids(observer))
    finally:
        observer.close()
    stats = get_stats()
    assert stats["pool_size"] == stats["pool_available"] == 1
