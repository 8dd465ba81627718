"""forking.py: in a forked child, pools, then peer sets, then the callbacks forget the parent.

A real ``fork()``, with fake connections (socket pairs): the child reports what it
sees through a pipe, the parent checks that its own state is untouched.
"""

from __future__ import annotations

import json
import os
import stat

import gevent
import gevent.event
import gevent.monkey
import gevent.os

from django_db_geventpool import forking
from django_db_geventpool.errors import PoolTimeout
from django_db_geventpool.peerset import PeerSet
from django_db_geventpool.pool import ConnectionPool
from tests.support.eventually import wait_until
from tests.unit.test_pool_unit import FakeConnectError, FakeDriver, Server

_original_waitpid = gevent.monkey.get_original("os", "waitpid")


def _read_report(fd: int) -> dict:
    """The child's JSON report, read to the end of the pipe, then the pipe closed.

    Read cooperatively: under gevent (25.8+), ``os.close`` of the parent's write end
    is deferred to the event loop, so a blocking read would never see the end.
    """
    gevent.os.make_nonblocking(fd)
    chunks = []
    while chunk := gevent.os.nb_read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks) or b"{}")


def _reap(pid: int) -> int:
    """Wait for the forked child to exit; its exit code.

    Not gevent's cooperative ``waitpid`` alone: with three runs in parallel, the
    first test hung in it 4 runs in 45 (likely a SIGCHLD that came before gevent's
    first child watcher was started). Called once the report was read to its end,
    i.e. the child is exiting, so the real, blocking ``waitpid`` is short. If
    gevent's watcher reaped it first, gevent has its status.
    """
    try:
        _, status = _original_waitpid(pid, 0)
    except ChildProcessError:
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _peered_pool(max_size: int, timeout: float) -> tuple[Server, PeerSet, ConnectionPool]:
    """A pool over two fake peers, as the Django glue builds one for ``PEERS``."""
    server = Server()
    peer_set = PeerSet("unit", ["x", "y"], check_interval=30.0, connect_errors=(FakeConnectError,))
    pool = ConnectionPool(
        "unit",
        FakeDriver(),
        max_size=max_size,
        timeout=timeout,
        opener=lambda reconnect: peer_set.open_connection(
            lambda peer, again: server.open(again), reconnect
        ),
        on_close=peer_set.closed,
    )
    return server, peer_set, pool


def _child_report(pool: ConnectionPool, peer_set: PeerSet, seen_by_callback: dict) -> dict:
    return {
        "pool_size": pool.get_stats()["pool_size"],
        "connections": [p.connections for p in peer_set.peers],
        "opening": [p.opening for p in peer_set.peers],
        "probing": [p.probing for p in peer_set.peers],
        "callback": seen_by_callback,
    }


def test_a_forked_child_forgets_pools_then_peer_sets_then_runs_callbacks():
    server, peer_set, pool = _peered_pool(max_size=2, timeout=5.0)
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
        os.close(write_end)
        report = _read_report(read_end)
        exit_code = _reap(pid)
    finally:
        forking._callbacks.remove(callback)
    assert exit_code == 0
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


def test_greenlets_of_a_busy_parent_leave_the_childs_pool_alone():
    """A connector, queued checkouts and a keepalive round trip in flight at fork time.

    They go on in the child too; when they resume there they must not touch the
    child's pool (counts, slots, waiters) nor use the parent's connections.
    """
    server, peer_set, pool = _peered_pool(max_size=3, timeout=10.0)
    held = pool.checkout()
    pool.checkin(pool.checkout())  # a second one, idle
    pinged = server.opened[1] if server.opened[0] is held.connection else server.opened[0]
    # A keepalive round trip in flight: it holds the idle one, with a slot.
    pinged.ping_gate = gevent.event.Event()
    pinged.server.send(b"!")  # input on an idle connection: due for a round trip
    keepalive = gevent.spawn(pool.keep_alive)
    wait_until(lambda: pinged.pings == 1)
    # A connect in flight (the last slot), and two checkouts queued behind it.
    server.connect_gate = gevent.event.Event()
    waiters = [gevent.spawn(pool.checkout, timeout=3.0) for _ in range(2)]
    wait_until(lambda: server.connects_started == 3)
    parent_stats = pool.get_stats()
    assert (parent_stats["pool_size"], parent_stats["pool_opening"]) == (3, 1)
    assert parent_stats["requests_waiting"] == 2
    inherited = [keepalive, *waiters, *pool._connectors]

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        report: dict = {}
        try:
            os.close(read_end)
            # The one in its round trip (out of the idle set, not in use) is detached
            # at fork time like the others: its descriptor now points at /dev/null.
            report["in_transit_detached"] = stat.S_ISCHR(os.fstat(pinged.client.fileno()).st_mode)
            # Let the parent's greenlets resume here: the connect and the round trip end.
            server.connect_gate.set()
            pinged.ping_gate.set()
            gevent.joinall(inherited, timeout=20)
            stats = pool.get_stats()
            report |= {
                "all_ended": all(g.dead for g in inherited),
                "waiters": [type(g.exception).__name__ for g in waiters],
                "stats": [stats[k] for k in ("pool_size", "pool_opening", "requests_waiting")],
                "parent_sockets_closed": [c.closed for c in server.opened[:3]],
                "peers": [(p.connections, p.opening) for p in peer_set.peers],
            }
            # The cap is intact: max_size checkouts of the child's own, then a timeout.
            leases = [pool.checkout(timeout=5) for _ in range(3)]
            report["own"] = [lease.connection.number for lease in leases]
            try:
                pool.checkout(timeout=0.1)
                report["fourth"] = "served"
            except PoolTimeout:
                report["fourth"] = "timeout"
            for lease in leases:
                pool.checkin(lease)
            stats = pool.get_stats()
            report["after"] = [stats[k] for k in ("pool_size", "pool_available")]
            report["peer_connections_after"] = sum(p.connections for p in peer_set.peers)
        except BaseException as exc:  # reported, so that the parent's assertion says what
            report["error"] = repr(exc)
        finally:
            try:
                os.write(write_end, json.dumps(report).encode())
            finally:
                os._exit(0)
    os.close(write_end)
    # The parent goes on at once: its connect and round trip end, its waiters are served.
    server.connect_gate.set()
    pinged.ping_gate.set()
    assert keepalive.get(timeout=10) == 0
    leases = [w.get(timeout=10) for w in waiters]
    stats = pool.get_stats()
    assert (stats["pool_size"], stats["pool_opening"], stats["requests_waiting"]) == (3, 0, 0)
    report = _read_report(read_end)
    assert _reap(pid) == 0
    assert report == {
        "in_transit_detached": True,
        "all_ended": True,
        # Ended without being served: the child never counted them.
        "waiters": ["PoolError", "PoolError"],
        "stats": [0, 0, 0],
        # The connections of the parent, including the one opened by the inherited
        # connector and the one in its keepalive round trip: never closed there.
        "parent_sockets_closed": [False, False, False],
        # The peer set counts nothing of the parent's either.
        "peers": [[0, 0], [0, 0]],
        "own": [3, 4, 5],
        "fourth": "timeout",
        "after": [3, 3],
        "peer_connections_after": 3,
    }
    # Nothing the child did reached the parent's connections.
    assert not any(c.closed for c in server.opened)
    assert sum(p.connections for p in peer_set.peers) == 3
    for lease in [held, *leases]:
        pool.checkin(lease)
    pool.close()
    assert [p.connections for p in peer_set.peers] == [0, 0]
