"""Checkout, reuse and return through Django, on a real server."""

import gevent
import pytest
from django.db import connection, connections

from django_db_geventpool import get_stats
from tests.support.eventually import wait_until
from tests.testapp.models import Item


def test_query_checks_out_and_request_end_gives_back():
    Item.objects.create(name="a")
    assert get_stats()["pool_size"] == 1
    assert get_stats()["pool_available"] == 0
    connections.close_all()
    stats = get_stats()
    assert stats["pool_available"] == 1
    assert stats["pool_size"] == 1


def test_connection_is_reused_across_greenlets():
    pids = []

    def work():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(cursor.fetchone()[0])
        connection.close()

    for _ in range(5):
        gevent.spawn(work).join()
    assert len(set(pids)) == 1
    assert get_stats()["connections_num"] == 1


def test_stats_have_the_documented_keys():
    stats = get_stats()
    for key in (
        "pool_max",
        "pool_size",
        "pool_available",
        "requests_waiting",
        "requests_num",
        "requests_wait_ms",
        "requests_errors",
        "connections_num",
        "connections_errors",
        "connections_lost",
        "returns_bad",
        "checks_roundtrip",
    ):
        assert isinstance(stats[key], int), key
    assert stats["pool_max"] == 4  # MAX_CONNS of the test settings


def test_stats_count_requests_and_connections():
    def work():
        try:
            Item.objects.count()
        finally:
            connection.close()

    gevent.joinall([gevent.spawn(work) for _ in range(10)], raise_error=True)
    # A connect the pool started for a waiter that a returned connection served
    # meanwhile finishes in the background (its connection goes idle).
    wait_until(lambda: get_stats()["pool_opening"] == 0)
    stats = get_stats()
    assert stats["requests_num"] == 10
    assert 1 <= stats["connections_num"] <= 4
    assert stats["pool_size"] == stats["pool_available"] == stats["connections_num"]
    assert stats["requests_errors"] == stats["connections_errors"] == 0


def test_get_stats_refuses_an_alias_that_is_not_pooled():
    connections.settings["plain"] = {
        **connections.settings["default"],
        "ENGINE": "django.db.backends.postgresql",
        "OPTIONS": {},
    }
    try:
        with pytest.raises(ValueError, match="not a django_db_geventpool ENGINE"):
            get_stats("plain")
    finally:
        del connections["plain"]
        del connections.settings["plain"]
