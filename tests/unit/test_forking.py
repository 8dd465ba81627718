"""forking.py: in a forked child, pools, then peer sets, then the callbacks forget the parent.

A real ``fork()``, with fake connections (socket pairs): the child reports what it
sees through a pipe, the parent checks that its own state is untouched.
"""

from __future__ import annotations

import json
import os

import gevent.os

from django_db_geventpool import forking
from django_db_geventpool.peerset import PeerSet
from django_db_geventpool.pool import ConnectionPool
from tests.unit.test_pool_unit import FakeConnectError, FakeDriver, Server


def _child_report(pool: ConnectionPool, peer_set: PeerSet, seen_by_callback: dict) -> dict:
    return {
        "pool_size": pool.get_stats()["pool_size"],
        "connections": [p.connections for p in peer_set.peers],
        "opening": [p.opening for p in peer_set.peers],
        "probing": [p.probing for p in peer_set.peers],
        "callback": seen_by_callback,
    }


def _read_to_eof(fd: int) -> bytes:
    """Everything written to the pipe ``fd`` until its write ends are closed; then close it."""
    gevent.os.make_nonblocking(fd)
    chunks = []
    try:
        while chunk := gevent.os.nb_read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def test_a_forked_child_forgets_pools_then_peer_sets_then_runs_callbacks():
    server = Server()
    peer_set = PeerSet("unit", ["x", "y"], check_interval=30.0, connect_errors=(FakeConnectError,))
    pool = ConnectionPool(
        "unit",
        FakeDriver(),
        max_size=2,
        timeout=5.0,
        opener=lambda reconnect: peer_set.open_connection(
            lambda peer, again: server.open(again), reconnect
        ),
        on_close=peer_set.closed,
    )
    held = pool.checkout()
    idle = pool.checkout()
    pool.checkin(idle)
    assert [p.connections for p in peer_set.peers] == [1, 1]
    # A connect of the parent in progress when it forks (a peer being probed).
    peer_set.peers[1].opening = 1
    peer_set.peers[1].probing = True

    seen_by_callback: dict = {}

    def callback() -> None:
        # Step 3 runs after steps 1 and 2: the pool and the peer set are already reset.
        seen_by_callback["pool_size"] = pool.get_stats()["pool_size"]
        seen_by_callback["connections"] = [p.connections for p in peer_set.peers]

    forking.on_fork_in_child(callback)
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.close(read_end)
                report = _child_report(pool, peer_set, seen_by_callback)
                report["inherited_closed"] = [c.closed for c in server.opened]
                os.write(write_end, json.dumps(report).encode())
            finally:
                os._exit(0)
        # gevent's os.close() leaves the actual close to the next iteration of the
        # loop: the pipe's end of file comes only once the loop ran. So read it
        # cooperatively, before waitpid (which need not yield: a busy machine may
        # have run the child to its end already), never with a blocking read.
        os.close(write_end)
        report = json.loads(_read_to_eof(read_end))
        _, status = os.waitpid(pid, 0)
    finally:
        forking._callbacks.remove(callback)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {
        "pool_size": 0,
        "connections": [0, 0],
        "opening": [0, 0],
        "probing": [False, False],
        "callback": {"pool_size": 0, "connections": [0, 0]},
        # Never closed in the child: closing would end (or hang on) the parent's session.
        "inherited_closed": [False, False],
    }
    # The parent is untouched: its connections, its counts, its sockets.
    assert pool.get_stats()["pool_size"] == 2
    assert [p.connections for p in peer_set.peers] == [1, 1]
    assert not any(c.closed for c in server.opened)
    pool.checkin(held)
    pool.close()
    assert [p.connections for p in peer_set.peers] == [0, 0]
