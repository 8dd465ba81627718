"""Checkout, reuse and return through Django, on a real server."""

import gevent
from django.db import connection, connections

from django_db_geventpool import get_stats
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
