"""Fork safety: a child never uses, closes or writes to its parent's connections.

The parent forks (``os.fork()``, gevent's) while it holds a connection, while a
greenlet of its is in the middle of a query, and while idle connections sit in
its pool. The child must start with an empty pool, open its own connections, and
close everything it has on the way out; meanwhile and afterwards the parent keeps
querying on the very same server connections (same backend pids) without an
error.
"""

import gc
import json
import logging
import os
import signal
import traceback

import gevent
import gevent.event
import gevent.os
import pytest
from django.db import connection, connections

from django_db_geventpool import get_stats
from tests.support.eventually import wait_until
from tests.support.helpers import (
    backend_pid,
    pool_pids,
    query,
    raw_connect,
    request_pid,
    wait_until_running,
)

logger = logging.getLogger(__name__)

IN_FLIGHT_LOCK = 7_315_001
IN_FLIGHT_SQL = f"SELECT pg_advisory_xact_lock({IN_FLIGHT_LOCK})"


def _pooled_query_pids(count: int) -> list[int]:
    """``count`` requests in a row from a fresh greenlet each; their backend pids."""
    return [gevent.spawn(request_pid).get() for _ in range(count)]


def _open_idle_connections(count: int) -> set[int]:
    """Open ``count`` connections at once and leave them idle in the pool; their pids."""
    pids: list[int] = []
    all_held = gevent.event.Event()

    def hold():
        pids.append(backend_pid())
        if len(pids) == count:
            all_held.set()
        assert all_held.wait(30), "the other connections were never held at the same time"
        connection.close()

    gevent.joinall([gevent.spawn(hold) for _ in range(count)], raise_error=True)
    return set(pids)


def _child(report_fd: int) -> None:
    """Runs in the forked child; reports to the parent through ``report_fd``."""
    report = {}
    try:
        report["stats_at_start"] = get_stats()
        report["held_connection_forgotten"] = connection.connection is None
        report["pids"] = [request_pid()]
        report["pids"] += _pooled_query_pids(3)
        report["stats_at_end"] = get_stats()
        # Leave the way a well-behaved worker does: close everything, collect.
        connections.close_all()
        connections["default"].close_pool()
        gc.collect()
        report["ok"] = True
    except BaseException:
        report["error"] = traceback.format_exc()
    finally:
        os.write(report_fd, json.dumps(report).encode())
        os._exit(0)


def _read_all(fd: int) -> bytes:
    gevent.os.make_nonblocking(fd)
    chunks = []
    while True:
        chunk = gevent.os.nb_read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@pytest.mark.parametrize("query_in_flight", [False, True], ids=["idle", "query-in-flight"])
def test_child_never_touches_the_parents_connections(configure_pool, query_in_flight):
    configure_pool(MAX_CONNS=3)
    parent_side = _open_idle_connections(3)
    held_pid = backend_pid()  # held by this greenlet across the fork
    in_flight = None
    if query_in_flight:
        # A parent greenlet in the middle of a query when the fork happens (its
        # driver may hold the connection's lock at that moment).
        # The query waits on an advisory lock the observer holds, so it is still
        # running at the fork whatever the machine's speed; it ends when released.
        lock_holder = raw_connect()
        query(lock_holder, "SELECT pg_advisory_lock(%s)", [IN_FLIGHT_LOCK])

        def slow_query():
            pid = backend_pid()
            with connection.cursor() as cursor:
                cursor.execute(IN_FLIGHT_SQL)
            connection.close()
            return pid

        in_flight = gevent.spawn(slow_query)
        wait_until_running(lock_holder, IN_FLIGHT_SQL)
    stats_before = get_stats()

    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        _child(write_fd)
    os.close(write_fd)

    # The parent keeps working while the child runs and exits.
    parent_errors = []
    parent_pids = []

    def keep_querying():
        try:
            parent_pids.extend(_pooled_query_pids(20))
        except Exception as exc:
            parent_errors.append(exc)

    worker = gevent.spawn(keep_querying)
    if query_in_flight:
        query(lock_holder, "SELECT pg_advisory_unlock(%s)", [IN_FLIGHT_LOCK])
        lock_holder.close()
    held_pids_meanwhile = [backend_pid() for _ in range(20)]
    with gevent.Timeout(30, RuntimeError("the child did not finish")):
        try:
            report = json.loads(_read_all(read_fd) or b"{}")
            _, status = os.waitpid(child, 0)
        except BaseException:
            os.kill(child, signal.SIGKILL)
            raise
        finally:
            os.close(read_fd)
    worker.join()
    if in_flight is not None:
        assert in_flight.get(timeout=30) in parent_side

    assert report.get("ok"), report.get("error", report)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    # The child started empty and used only its own connections.
    assert report["stats_at_start"]["pool_size"] == 0
    assert report["stats_at_start"]["pool_available"] == 0
    assert report["held_connection_forgotten"] is True
    assert not set(report["pids"]) & parent_side
    assert report["stats_at_end"]["pool_size"] <= 3

    # The parent never noticed: same server connections, no errors, none lost.
    assert parent_errors == []
    assert set(held_pids_meanwhile) == {held_pid}
    assert backend_pid() == held_pid
    assert set(parent_pids) <= parent_side
    stats = get_stats()
    assert stats["connections_lost"] == 0
    assert stats["requests_errors"] == 0
    assert stats["connections_num"] == stats_before["connections_num"]
    observer = raw_connect()
    try:
        # The child closed its own connections before it exited; their backends end
        # on their own time (later on a loaded machine): wait for that, not a moment.
        child_side = set(report["pids"])
        wait_until(lambda: not child_side & pool_pids(observer))
        alive = pool_pids(observer)
    finally:
        observer.close()
    assert parent_side <= alive
