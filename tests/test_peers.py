"""PEERS: one pool over two real clusters, with failover and recovery.

The module starts two clusters of its own (A and B), creates the test schema on
each, and adds DATABASES entries for them while it runs:

* ``peer_a`` / ``peer_b``: one cluster each, no PEERS (used to create the schema);
* ``peered``: cluster A's settings with ``PEERS = ["peer_b"]`` -- the alias the
  tests use, so the suite's ``default`` alias is left alone;
* ``peer_hanging`` (a listener that never answers) and ``multihost`` (libpq's
  ``HOST: "a,b"``), for one test each.

Which server answered is told by the server itself (``current_setting('port')``).
"""

from __future__ import annotations

import logging
import os
import signal
from time import monotonic

import gevent
import gevent.event
import gevent.server
import pytest
from django.core.management import call_command
from django.db import DatabaseError, OperationalError, connections

from django_db_geventpool import AllPeersDown, PoolTimeout, get_stats, registry, signals
from django_db_geventpool.peerset import PeerSet
from tests.support.eventually import wait_until
from tests.support.helpers import checkout_timeout, database_entry, drop_alias
from tests.support.pgserver import PostgresCluster, free_port
from tests.testapp.models import Item

logger = logging.getLogger(__name__)

PEERED = "peered"
APPLICATION_NAME = "geventpool-peers-test"
TEST_DB = "geventpool_test"
ALIASES = ("peer_a", "peer_b", "peer_hanging", "peer_refusing", PEERED, "multihost")


def _entry(host: str, port: str | int, **options) -> dict:
    """A complete DATABASES entry (the default's, as Django configured it) for a server."""
    return database_entry(host, port, APPLICATION_NAME, **options)


@pytest.fixture(scope="module")
def clusters():
    """Two running clusters (A, B), each with the test database and schema."""
    started = [PostgresCluster(), PostgresCluster()]
    try:
        for cluster in started:
            cluster.start()
            cluster.psql(f"CREATE DATABASE {TEST_DB}")
        a, b = started
        connections.settings["peer_a"] = _entry(a.socket_dir, a.port)
        connections.settings["peer_b"] = _entry(b.socket_dir, b.port)
        for alias in ("peer_a", "peer_b"):
            call_command("migrate", database=alias, run_syncdb=True, verbosity=0)
            connections[alias].close()
            connections[alias].close_pool()
        yield a, b
    finally:
        for alias in ALIASES:
            drop_alias(alias)
        for cluster in started:
            cluster.destroy()


@pytest.fixture
def peered(clusters):
    """Configure the ``peered`` alias (A + peer B): ``peered(MAX_CONNS=4, ...)``.

    Both clusters are running when the test starts; the pool is closed after it.
    """
    a, _ = clusters
    for cluster in clusters:
        if not cluster.is_running():
            cluster.start()

    def configure(peers=("peer_b",), **options) -> dict:
        drop_alias(PEERED)
        pool_options = {"MAX_CONNS": 4, "CHECK_INTERVAL": 30.0, **options}
        connections.settings[PEERED] = {
            **_entry(a.socket_dir, a.port, **pool_options),
            "PEERS": list(peers),
        }
        return connections.settings[PEERED]

    yield configure
    drop_alias(PEERED)


def stop_server(cluster: PostgresCluster) -> None:
    """Stop ``cluster`` as ``pg_ctl stop -m fast`` would, by signal, and wait until it is gone.

    No subprocess while requests run: these tests are about failover, and stay
    independent of how the pool behaves across ``fork()`` (test_fork.py covers
    that; a fork with psycopg2 queries in flight used to hang the child).
    """
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)  # the postmaster's "fast shutdown"

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(gone, timeout=30)


def serve_request(alias: str = PEERED) -> str:
    """One request: an ORM query and the answering server's port; then give back."""
    connection = connections[alias]
    try:
        Item.objects.using(alias).exists()
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('port')")
            return cursor.fetchone()[0]
    finally:
        connection.close()


class Load:
    """Greenlets serving requests in a loop; each outcome recorded with its start time."""

    def __init__(self, alias: str = PEERED, greenlets: int = 8, pause: float = 0.003) -> None:
        self.alias = alias
        self.pause = pause
        self.results: list[tuple[float, str | None, BaseException | None]] = []
        self._running = True
        self._greenlets = [gevent.spawn(self._run) for _ in range(greenlets)]

    def _run(self) -> None:
        while self._running:
            started = monotonic()
            try:
                port = serve_request(self.alias)
            except DatabaseError as exc:
                self.results.append((started, None, exc))
            else:
                self.results.append((started, port, None))
            gevent.sleep(self.pause)

    def stop(self) -> None:
        self._running = False
        # Bounded: a request stuck in a connect must fail the test, not hang it.
        gevent.joinall(self._greenlets, timeout=30, raise_error=True)
        stuck = [g for g in self._greenlets if not g.dead]
        gevent.killall(stuck)
        assert not stuck, f"{len(stuck)} requests still running 30 s after the load stopped"

    def __enter__(self) -> Load:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.stop()
        else:  # a failed test must not leave requests running
            self._running = False
            gevent.killall(self._greenlets)

    def ports(self, since: float = 0.0) -> set[str]:
        return {port for started, port, _ in self.results if port is not None and started > since}

    def failures(self, since: float = 0.0) -> list[BaseException]:
        return [exc for started, _, exc in self.results if exc is not None and started > since]

    def count(self, since: float = 0.0) -> int:
        return sum(1 for started, _, _ in self.results if started > since)


def peer_stats(alias: str = PEERED) -> dict[str, int]:
    return {k: v for k, v in get_stats(alias).items() if k.startswith("peer.")}


def down_since(peer: str) -> float:
    """When the pool marked ``peer`` down (monotonic), from its peer set."""
    peer_set: PeerSet = registry.aliases[PEERED].peer_set
    (found,) = [p for p in peer_set.peers if p.name == peer]
    assert found.down_since is not None
    return found.down_since


def test_load_is_spread_over_both_peers(clusters, peered):
    a, b = clusters
    peered(MAX_CONNS=4)
    with Load() as load:
        wait_until(lambda: load.count() >= 100, timeout=60)
    assert load.failures() == []
    assert load.ports() == {str(a.port), str(b.port)}
    stats = get_stats(PEERED)
    assert stats["peer.peered.up"] == 1 and stats["peer.peer_b.up"] == 1
    assert stats["peer.peered.connects_failed"] == 0 and stats["peer.peer_b.connects_failed"] == 0
    # Fewest connections first: the pool's connections are split evenly.
    on_a, on_b = stats["peer.peered.connections"], stats["peer.peer_b.connections"]
    assert on_a + on_b == stats["pool_size"] >= 2
    assert abs(on_a - on_b) <= 1
    # Idle connections to either peer were reused (the target is the peer set's).
    assert stats["connections_num"] == stats["pool_size"]


def test_stopping_a_peer_under_load_fails_no_request_once_detected(clusters, peered):
    a, b = clusters
    peered(MAX_CONNS=4, CHECK_INTERVAL=30.0)
    with Load() as load:
        wait_until(lambda: str(b.port) in load.ports() and load.count() >= 50, timeout=60)
        stop_server(b)
        stopped = monotonic()
        wait_until(lambda: peer_stats()["peer.peer_b.up"] == 0, timeout=60)
        # From here the pool has seen the failure, and every server process of B is
        # gone (the postmaster waits for them), so every idle connection to B shows EOF.
        detected = max(down_since("peer_b"), stopped)
        wait_until(lambda: load.count(since=detected) >= 200, timeout=60)

    during_detection = load.failures()
    logger.info(
        "stopping a peer under load: %d of %d requests failed before the pool marked it down",
        len(during_detection),
        load.count(),
    )
    # Only requests holding a connection to B when it stopped can fail (at most
    # MAX_CONNS); none that started after the pool saw the failure.
    assert len(during_detection) <= 4
    assert load.failures(since=detected) == []
    assert load.ports(since=detected) == {str(a.port)}
    stats = peer_stats()
    assert stats["peer.peer_b.up"] == 0
    assert stats["peer.peer_b.connections"] == 0
    assert stats["peer.peered.connections"] >= 1
    # Each checkout racing the failure tried B at most once; after that no request
    # tried B again (CHECK_INTERVAL is 30 s), although hundreds needed connections.
    assert 1 <= stats["peer.peer_b.connects_failed"] <= 4


def test_a_hanging_peer_costs_one_connect_per_interval_not_one_per_request(clusters, peered):
    """A peer that accepts and never answers: only connect_timeout ends a connect to
    it (psycopg2 included), and requests do not each wait for it."""
    accepted = []
    finished = gevent.event.Event()

    def never_answer(sock, address):
        accepted.append(address)
        finished.wait()
        sock.close()

    server = gevent.server.StreamServer(("127.0.0.1", free_port()), never_answer)
    server.start()
    try:
        connections.settings["peer_hanging"] = _entry(
            "127.0.0.1",
            server.server_port,
            connect_timeout=2,
            sslmode="disable",
            gssencmode="disable",
        )
        # REUSE_CONNS=0: every request opens a new connection, so each one would
        # try the hanging peer if the pool did not remember that it is down.
        peered(peers=["peer_hanging"], MAX_CONNS=4, REUSE_CONNS=0, CHECK_INTERVAL=30.0)
        with Load(greenlets=4) as load:
            # Requests do not wait for the hanging connects (the pool's connectors
            # do, until connect_timeout): the load goes on until those end.
            wait_until(
                lambda: load.count() >= 100 and peer_stats()["peer.peer_hanging.up"] == 0,
                timeout=60,
            )
    finally:
        finished.set()
        server.stop()
    # Connects that chose the hanging peer with the first one end (fail) when their
    # socket closes or at connect_timeout: count them once no connect is running.
    wait_until(lambda: get_stats(PEERED)["pool_opening"] == 0)
    a, _ = clusters
    assert load.failures() == []
    assert load.ports() == {str(a.port)}
    stats = get_stats(PEERED)
    # Many connects (REUSE_CONNS=0; a returned connection may still go straight
    # to a waiting request), of which only the first few tried the hanging peer.
    assert stats["connections_num"] >= 20
    assert stats["peer.peer_hanging.up"] == 0
    # Only the checkouts that chose it before the first failure tried it.
    assert 1 <= len(accepted) <= 4
    assert stats["peer.peer_hanging.connects_failed"] == len(accepted)


def test_a_restarted_peer_takes_connections_again(clusters, peered):
    a, b = clusters
    # MAX_LIFETIME moves the load back: old connections expire, new ones go to
    # the peer with the fewest connections, the one that came back.
    peered(MAX_CONNS=4, CHECK_INTERVAL=0.5, MAX_LIFETIME=1.0)
    stop_server(b)
    with Load() as before:
        wait_until(lambda: peer_stats()["peer.peer_b.up"] == 0 and before.count() >= 50, timeout=60)
    assert before.ports() == {str(a.port)}
    b.start()  # (pg_ctl forks: not while requests run, see stop_server)
    with Load() as after:
        wait_until(lambda: str(b.port) in after.ports(), timeout=60)
        wait_until(lambda: peer_stats()["peer.peer_b.connections"] >= 1, timeout=60)
    assert before.failures() == [] and after.failures() == []
    stats = peer_stats()
    assert stats["peer.peer_b.up"] == 1
    assert stats["peer.peer_b.connects"] >= 1


def test_all_peers_down_waits_then_times_out_naming_each_peer_then_recovers(
    clusters, peered, caplog
):
    a, b = clusters
    # A generous POOL_TIMEOUT (it also bounds each connect) for the first request;
    # the checkout that must time out waits 2.5 s.
    peered(MAX_CONNS=4, CHECK_INTERVAL=1.0, POOL_TIMEOUT=30)
    assert serve_request() in (str(a.port), str(b.port))
    stop_server(a)
    stop_server(b)
    caplog.set_level(logging.WARNING, logger="django_db_geventpool")

    started = monotonic()
    with checkout_timeout(2.5, PEERED), pytest.raises(PoolTimeout) as first:
        serve_request()
    waited = monotonic() - started
    # Connect trouble degrades to waiting: the checkout used its wait (2.5 s)
    # (it would have been served had a peer come back), and no more (a generous
    # upper bound: a loaded machine wakes the waiter late).
    assert 2.4 <= waited < 2.5 + 3
    marked_down = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "marked down" in r.getMessage()
    ]
    for peer in ("'peered'", "'peer_b'"):
        assert [m for m in marked_down if f"peer {peer} marked down" in m], marked_down
    # The PoolTimeout says why: every peer, since when, and its last error.
    message = str(first.value)
    assert "connects to the server are failing" in message
    for peer in ("'peered' down since", "'peer_b' down since"):
        assert peer in message
    assert message.count("last error:") >= 2
    assert isinstance(first.value, OperationalError)
    assert isinstance(first.value.__cause__, AllPeersDown)
    stats = get_stats(PEERED)
    assert stats["peer.peered.up"] == 0 and stats["peer.peer_b.up"] == 0
    # Each peer is tried about once per CHECK_INTERVAL (1 s) of the time the test
    # measured, not once per waiter or retry.
    for peer in ("peered", "peer_b"):
        assert 1 <= stats[f"peer.{peer}.connects_failed"] <= waited / 1.0 + 2
    assert stats["requests_waiting"] == 0

    # A request that waits across the recovery is served (with the generous
    # POOL_TIMEOUT: starting a server, the next probe (CHECK_INTERVAL) and the
    # pool's connect backoff (up to 2 s) can together take seconds here).
    waiting = gevent.spawn(serve_request)
    wait_until(lambda: get_stats(PEERED)["requests_waiting"] == 1)
    a.start()
    assert waiting.get(timeout=90) == str(a.port)
    recovered = get_stats(PEERED)
    assert recovered["peer.peered.up"] == 1
    assert recovered["peer.peered.connections"] >= 1


def _refusing_peer() -> None:
    """``peer_refusing``: a TCP port where nothing listens, so every connect is refused."""
    connections.settings["peer_refusing"] = _entry("127.0.0.1", free_port())


def _held_requests(count: int, alias: str = PEERED) -> list[tuple[str, str]]:
    """``count`` requests holding a connection at once: (port, application_name) of each."""
    all_in = gevent.event.Event()
    answers: list[tuple[str, str]] = []

    def request() -> None:
        connection = connections[alias]
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT current_setting('port'), current_setting('application_name')"
                )
                answers.append(tuple(cursor.fetchone()))
            if len(answers) == count:
                all_in.set()
            all_in.wait(30)
        finally:
            connection.close()

    gevent.joinall([gevent.spawn(request) for _ in range(count)], raise_error=True)
    return answers


def test_peers_and_check_interval_inside_options(clusters, peered):
    """PEERS and CHECK_INTERVAL in OPTIONS, nothing at the top level; each peer
    connects with its own DATABASES entry (peer_b's own application_name)."""
    a, b = clusters
    peered(peers=())  # both clusters up; the alias is replaced below
    _refusing_peer()
    peer_b_options = connections.settings["peer_b"]["OPTIONS"]
    peer_b_options["application_name"] = "geventpool-peer-b-own-entry"
    try:
        connections.settings[PEERED] = _entry(
            a.socket_dir,
            a.port,
            MAX_CONNS=4,
            PEERS=["peer_b", "peer_refusing"],
            CHECK_INTERVAL=7.5,
        )
        assert "PEERS" not in connections.settings[PEERED]
        # Three connections at once, fewest per peer first: one on each peer, the
        # refused one moved to A or B.
        answers = _held_requests(3)
    finally:
        peer_b_options["application_name"] = APPLICATION_NAME
    assert {port for port, _ in answers} == {str(a.port), str(b.port)}
    # Each server saw the application_name of its own entry.
    for port, application_name in answers:
        expected = "geventpool-peer-b-own-entry" if port == str(b.port) else APPLICATION_NAME
        assert application_name == expected, answers
    stats = peer_stats()
    assert stats["peer.peer_refusing.up"] == 0
    assert stats["peer.peer_refusing.connects_failed"] == 1
    assert stats["peer.peered.connections"] + stats["peer.peer_b.connections"] == 3
    # Skipped for OPTIONS["CHECK_INTERVAL"], not the default 30 s.
    peer_set: PeerSet = registry.aliases[PEERED].peer_set
    (refusing,) = [p for p in peer_set.peers if p.name == "peer_refusing"]
    assert refusing.retry_at - refusing.down_since == pytest.approx(7.5)


def test_top_level_check_interval_is_honoured(clusters, peered):
    """PEERS and CHECK_INTERVAL at the top level (django-proxysql's form): a refused
    peer is retried after CHECK_INTERVAL, not after the default 30 s."""
    a, _ = clusters
    _refusing_peer()
    # REUSE_CONNS=0: every request opens a connection, so each could retry the peer.
    peered(peers=["peer_refusing"], MAX_CONNS=2, REUSE_CONNS=0)
    settings_dict = connections.settings[PEERED]
    del settings_dict["OPTIONS"]["CHECK_INTERVAL"]
    # Long enough that the request right after the refusal is within it even on a
    # loaded machine; far below the default 30 s.
    settings_dict["CHECK_INTERVAL"] = 3.0
    # Two at once: the second goes to the peer with fewer connections, so the
    # refusing peer is tried whichever the first one chose.
    assert {port for port, _ in _held_requests(2)} == {str(a.port)}
    assert peer_stats()["peer.peer_refusing.connects_failed"] == 1
    peer_set: PeerSet = registry.aliases[PEERED].peer_set
    (refusing,) = [p for p in peer_set.peers if p.name == "peer_refusing"]
    assert refusing.retry_at - refusing.down_since == pytest.approx(3.0)
    assert serve_request() == str(a.port)  # within the interval: not tried
    assert peer_stats()["peer.peer_refusing.connects_failed"] == 1
    gevent.sleep(max(refusing.retry_at - monotonic(), 0) + 0.1)
    assert serve_request() == str(a.port)  # due: retried (and refused again)
    stats = peer_stats()
    assert stats["peer.peer_refusing.connects_failed"] == 2
    assert stats["peer.peer_refusing.up"] == 0


def test_migrate_and_checks_run_on_whichever_peer_is_up(clusters, peered):
    a, b = clusters
    peered(MAX_CONNS=2)
    stop_server(a)
    # Two connections at once: the second goes to the peer with fewer, so A is
    # tried (and found down) whichever peer the first one chose.
    both = [gevent.spawn(serve_request) for _ in range(2)]
    gevent.joinall(both, raise_error=True)
    assert [g.value for g in both] == [str(b.port)] * 2
    assert get_stats(PEERED)["peer.peered.up"] == 0

    call_command("check", databases=[PEERED])
    call_command("migrate", database=PEERED, verbosity=0)
    assert serve_request() == str(b.port)
    stats = get_stats(PEERED)
    assert stats["peer.peered.up"] == 0
    assert stats["peer.peer_b.up"] == 1


def test_peers_must_be_databases_aliases(peered):
    from django.core.exceptions import ImproperlyConfigured

    peered(peers=["no_such_alias"])
    with pytest.raises(ImproperlyConfigured, match="no_such_alias"):
        serve_request()


def test_libpq_multi_host_keeps_working_through_the_pool(clusters):
    """HOST "a,b" with load_balance_hosts: libpq picks the server, the pool just pools."""
    a, b = clusters
    connections.settings["multihost"] = {
        **_entry(
            "127.0.0.1,127.0.0.1",
            f"{a.port},{b.port}",
            # REUSE_CONNS=0: every request connects, so libpq's random choice shows.
            MAX_CONNS=4,
            REUSE_CONNS=0,
            load_balance_hosts="random",
            target_session_attrs="read-write",
        ),
    }
    try:
        with Load(alias="multihost") as load:
            wait_until(lambda: load.ports() == {str(a.port), str(b.port)}, timeout=60)
            stop_server(a)
            stopped = monotonic()
            wait_until(lambda: load.count(since=stopped) >= 100, timeout=60)
        # Connections to A are found broken at checkout and replaced; libpq skips
        # the stopped host. Only requests running on A when it stopped can fail.
        failed = load.failures()
        logger.info("libpq multi-host: %d requests failed while a host stopped", len(failed))
        assert len(failed) <= 4
        tail = sorted(load.results)[-50:]
        assert all(exc is None and port == str(b.port) for _, port, exc in tail)
    finally:
        if not a.is_running():
            a.start()
        drop_alias("multihost")


def test_a_due_peer_is_retried_by_one_checkout_at_a_time():
    """Pure PeerSet: while one checkout retries a down peer, others use the healthy one."""
    peer_set = PeerSet("pure", ["x", "y"], check_interval=0.01, connect_errors=(ConnectionError,))
    x = peer_set.peers[0]
    x.up, x.down_since, x.down_since_wall, x.retry_at = False, monotonic(), 0.0, 0.0
    release = gevent.event.Event()
    opened: list[str] = []

    def open_on_peer(name: str, reconnect: bool) -> object:
        if name == "x":
            release.wait()
        opened.append(name)
        return object()

    prober = gevent.spawn(peer_set.open_connection, open_on_peer, False)
    gevent.sleep(0)
    assert x.probing
    others = [peer_set.open_connection(open_on_peer, False) for _ in range(3)]
    assert opened == ["y", "y", "y"]
    release.set()
    prober.join()
    assert opened[-1] == "x" and x.up
    assert peer_set.get_stats() == {
        "peer.x.up": 1,
        "peer.x.connections": 1,
        "peer.x.connects": 1,
        "peer.x.connects_failed": 0,
        "peer.y.up": 1,
        "peer.y.connections": 3,
        "peer.y.connects": 3,
        "peer.y.connects_failed": 0,
    }
    for raw in others:
        peer_set.closed(raw)
    assert peer_set.get_stats()["peer.y.connections"] == 0


def test_reconnect_hooks_run_around_each_peer_tried_after_the_first(clusters, peered):
    """docs/peers.md: the hooks run before and after each peer tried after the first."""
    a, b = clusters
    peered(MAX_CONNS=4, CHECK_INTERVAL=30.0)
    calls: list[tuple[str, str]] = []

    def pre(dbwrapper):
        calls.append(("pre", dbwrapper.alias))

    def post(dbwrapper):
        calls.append(("post", dbwrapper.alias))

    stop_server(a)
    signals.add_pre_reconnect_hook(pre)
    signals.add_post_reconnect_hook(post)
    release = gevent.event.Event()
    ports: list[str] = []

    def hold() -> None:
        connection = connections[PEERED]
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT current_setting('port')")
                ports.append(cursor.fetchone()[0])
            release.wait(30)
        finally:
            connection.close()

    holders = []
    try:
        # Each held checkout opens a connection on the peer with the fewest: by the
        # second one at the latest, A (stopped, no connection yet) is tried first,
        # refuses, and B is tried after it: one pre and one post hook. A is then
        # skipped while down, so B is the first peer tried: no more hooks.
        for count in range(1, 5):
            holders.append(gevent.spawn(hold))
            wait_until(lambda count=count: len(ports) == count, timeout=60)
        assert ports == [str(b.port)] * 4
        assert calls == [("pre", PEERED), ("post", PEERED)]
    finally:
        release.set()
        gevent.joinall(holders, timeout=10)
        signals.remove_reconnect_hook(pre)
        signals.remove_reconnect_hook(post)
