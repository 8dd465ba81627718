"""`close_connection` gives the current greenlet's connections back, whatever happens."""

from __future__ import annotations

import gevent
import pytest
from django.db import connection
from gevent.event import Event

from django_db_geventpool import get_stats
from django_db_geventpool.utils import close_connection


def _use_connection() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def _given_back() -> bool:
    """Given back by close_connection itself: not reclaimed, nothing in use."""
    stats = get_stats()
    return (
        stats["pool_available"] == stats["pool_size"] == 1 and stats["connections_reclaimed"] == 0
    )


def test_decorator_without_parentheses():
    @close_connection
    def task(x):
        """A task."""
        _use_connection()
        return x * 2

    assert gevent.spawn(task, 21).get(timeout=30) == 42
    assert task.__name__ == "task" and task.__doc__ == "A task."
    assert _given_back()


def test_decorator_with_parentheses():
    @close_connection()
    def task():
        return _use_connection()

    assert gevent.spawn(task).get(timeout=30) > 0
    assert _given_back()


def test_context_manager():
    def task():
        with close_connection():
            _use_connection()
        # Given back at the end of the block, while the greenlet still runs.
        return get_stats()["pool_available"]

    assert gevent.spawn(task).get(timeout=30) == 1
    assert _given_back()


def test_gives_back_on_exception():
    @close_connection
    def task():
        _use_connection()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        gevent.spawn(task).get(timeout=30)
    assert _given_back()


def test_gives_back_when_the_greenlet_is_killed():
    inside = Event()

    @close_connection
    def task():
        _use_connection()
        inside.set()
        gevent.sleep(30)

    greenlet = gevent.spawn(task)
    inside.wait(30)
    greenlet.kill()
    assert greenlet.dead
    assert _given_back()


def test_context_manager_on_the_main_greenlet():
    with close_connection():
        _use_connection()
        assert get_stats()["pool_available"] == 0
    assert _given_back()
    assert connection.connection is None


def test_harmless_when_nothing_is_open():
    @close_connection
    def task():
        return "done"

    assert gevent.spawn(task).get(timeout=30) == "done"
    with close_connection():
        pass
    assert get_stats()["pool_size"] == 0
    assert get_stats()["requests_num"] == 0


def test_rejects_a_non_callable():
    with pytest.raises(TypeError):
        close_connection("not a function")


def test_old_import_path():
    # django-db-geventpool 4.x users import it from here.
    from django_db_geventpool.utils import close_connection as old_path

    @old_path
    def task():
        return _use_connection()

    assert gevent.spawn(task).get(timeout=30) > 0
    assert _given_back()


@pytest.fixture
def more_aliases():
    """A second pooled alias, and two aliases on Django's own PostgreSQL backend."""
    from django.db import connections

    default = connections.settings["default"]
    added = {
        "second": {**default, "OPTIONS": {**default["OPTIONS"]}},
        "plain": {
            **default,
            "ENGINE": "django.db.backends.postgresql",
            "OPTIONS": {"application_name": "geventpool-plain"},
            "CONN_MAX_AGE": 0,
        },
        "plain_persistent": {
            **default,
            "ENGINE": "django.db.backends.postgresql",
            "OPTIONS": {"application_name": "geventpool-plain"},
            "CONN_MAX_AGE": None,
        },
    }
    connections.settings.update(added)
    yield list(added)
    for alias in added:
        connections[alias].close()
        if alias == "second":
            connections[alias].close_pool()
        del connections[alias]
        del connections.settings[alias]


def test_gives_back_every_alias_and_treats_other_backends_as_a_request_end(more_aliases):
    from django.db import connections

    aliases = ["default", *more_aliases]

    @close_connection
    def use_all() -> None:
        for alias in aliases:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT 1")

    def request() -> dict[str, bool]:
        use_all()
        still_open = {alias: connections[alias].connection is not None for alias in aliases}
        connections["plain_persistent"].close()
        return still_open

    still_open = gevent.spawn(request).get(timeout=30)
    # Both pools got their connection back; Django's backend closed the CONN_MAX_AGE=0
    # connection and kept the persistent one, as at the end of a request.
    assert still_open == {
        "default": False,
        "second": False,
        "plain": False,
        "plain_persistent": True,
    }
    for alias in ("default", "second"):
        stats = get_stats(alias)
        assert stats["pool_size"] == stats["pool_available"] == 1, alias
        assert stats["connections_reclaimed"] == 0, alias
