"""The fault tests' load generator reports a request that never ends instead of hiding it."""

from __future__ import annotations

import pytest

from tests.support.helpers import query, raw_connect, wait_until_gone, wait_until_running
from tests.support.load import Load

SLOW = "SELECT pg_sleep(60)"


def test_stop_fails_on_a_request_still_running(configure_pool):
    configure_pool(MAX_CONNS=2)
    observer = raw_connect()
    load = Load(concurrency=2, sql=SLOW).start()
    sleeping: set[int] = set()
    try:
        sleeping = wait_until_running(observer, SLOW, count=2)  # both requests are in the server
        with pytest.raises(
            AssertionError, match=r"2 of 2 load greenlets still in a request"
        ) as excinfo:
            load.stop(timeout=0.5)
    finally:
        # psycopg2 cannot cancel the interrupted queries: end their backends, or they
        # would sleep on into the next tests, which count the pool's backends.
        for pid in sleeping:
            query(observer, "SELECT pg_terminate_backend(%s)", [pid])
        wait_until_gone(observer, *sleeping)
        observer.close()
    assert "in _request" in str(excinfo.value)  # the stuck greenlets' stacks
    assert all(greenlet.dead for greenlet in load._greenlets)
