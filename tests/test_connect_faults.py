"""Connect trouble: a checkout ends within POOL_TIMEOUT, and a refused connect makes it wait.

* A listener that accepts TCP connections and never answers (a blackholed
  address, a load balancer without a backend): every checkout ends with an
  ``OperationalError`` within ``POOL_TIMEOUT`` (+ 2 s of slack for a loaded machine:
  without the pool's deadline a checkout would hang), and once the connects the
  pool started reach their own deadline, every slot is free.
* A role with ``CONNECTION LIMIT 4`` under ``MAX_CONNS=10``: requests queue on the
  four connections the server grants, none fails, and the pool never holds more.
* A frozen server (every process SIGSTOPped) with connections idle in the pool and
  a round trip at every checkout: every checkout still ends within its wait (1 s).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
from time import monotonic

import gevent
import gevent.server
import pytest
from django.db import OperationalError, connections, transaction

from django_db_geventpool import get_stats
from tests.support.eventually import wait_until
from tests.support.helpers import ServerConnectionSampler, checkout_timeout
from tests.support.pgserver import PostgresCluster

logger = logging.getLogger(__name__)

# Past POOL_TIMEOUT, how late a checkout may end on a loaded 2-core machine (twenty
# greenlets woken at once, other processes on the CPUs): generous, yet far below
# "hangs until the server answers".
SLACK = 2.0
# The checkout wait while the server is frozen.
FROZEN_WAIT = 1.0


def _timed_request(
    alias: str, statement: str | None = "SELECT 1"
) -> tuple[float, BaseException | None]:
    """One request on ``alias`` (a checkout, then ``statement`` if given): how long, what error."""
    started = monotonic()
    error: BaseException | None = None
    try:
        if statement is None:
            connections[alias].ensure_connection()
        else:
            with connections[alias].cursor() as cursor:
                cursor.execute(statement)
    except BaseException as exc:
        error = exc
    finally:
        connections[alias].close()
    return monotonic() - started, error


def _add_alias(alias: str, **entry) -> None:
    settings = copy.deepcopy(connections.settings["default"])
    options = entry.pop("OPTIONS", {})
    settings.update(entry)
    settings["OPTIONS"] = {**settings["OPTIONS"], **options}
    connections.settings[alias] = settings


def _drop_alias(alias: str) -> None:
    connections[alias].close()
    connections[alias].close_pool()
    del connections[alias]
    del connections.settings[alias]


@pytest.fixture
def silent_listener():
    """A TCP listener that accepts every connection and never sends a byte."""
    accepted = []

    def swallow(sock, address):
        accepted.append(address)
        try:
            sock.recv(65536)  # the startup packet; then silence until closed
            gevent.sleep(3600)
        finally:
            sock.close()

    server = gevent.server.StreamServer(("127.0.0.1", 0), swallow)
    server.start()
    try:
        yield server, accepted
    finally:
        server.stop(timeout=1)


def test_a_server_that_never_answers_ends_every_checkout_in_time(silent_listener):
    server, accepted = silent_listener
    alias = "silent"
    # No connect_timeout in OPTIONS: the pool's own deadline must bound the connects.
    _add_alias(
        alias,
        HOST="127.0.0.1",
        PORT=str(server.server_port),
        OPTIONS={"MAX_CONNS": 5, "POOL_TIMEOUT": 1.0},
    )
    try:
        jobs = [gevent.spawn(_timed_request, alias, None) for _ in range(20)]
        gevent.joinall(jobs, timeout=30)
        outcomes = [job.value for job in jobs if job.successful()]
        logger.info(
            "never answering: %d outcomes, durations %.2f..%.2fs, errors %s",
            len(outcomes),
            min(d for d, _ in outcomes),
            max(d for d, _ in outcomes),
            {type(e).__name__ for _, e in outcomes},
        )
        assert len(outcomes) == 20
        for duration, error in outcomes:
            assert isinstance(error, OperationalError), error
            assert duration < 1.0 + SLACK, duration
        assert accepted, "the pool never tried to connect"
        # The connects the pool started end at their own deadline and free their slots.
        wait_until(lambda: get_stats(alias)["pool_size"] == 0)
        stats = get_stats(alias)
        assert stats["requests_waiting"] == 0
        assert stats["pool_opening"] == 0
        assert stats["requests_errors"] == 20
        assert stats["connections_errors"] >= 1
    finally:
        _drop_alias(alias)


@pytest.fixture
def limited_role(cluster):
    """A role the server lets open 4 connections, and an alias logging in as it."""
    role, alias = "geventpool_limited", "limited"
    cluster.psql(f"DROP ROLE IF EXISTS {role}")
    cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'limited' CONNECTION LIMIT 4")
    _add_alias(
        alias,
        USER=role,
        PASSWORD="limited",
        OPTIONS={"MAX_CONNS": 10, "POOL_TIMEOUT": 10.0, "application_name": "geventpool-limited"},
    )
    try:
        yield alias
    finally:
        _drop_alias(alias)
        cluster.psql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        )
        wait_until(
            lambda: (
                cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'")
                == "0"
            )
        )
        cluster.psql(f"DROP ROLE {role}")


def test_the_pool_serves_with_the_connections_the_server_grants(limited_role, caplog):
    alias = limited_role
    caplog.set_level(logging.WARNING, logger="django_db_geventpool.pool")
    failures: list[BaseException] = []
    served = []

    def worker() -> None:
        for _ in range(10):
            try:
                with connections[alias].cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    served.append(cursor.fetchone()[0])
            except Exception as exc:
                failures.append(exc)
            finally:
                connections[alias].close()

    started = monotonic()
    with ServerConnectionSampler("geventpool-limited") as sampler:
        gevent.joinall([gevent.spawn(worker) for _ in range(50)], timeout=60, raise_error=True)
    stats = get_stats(alias)
    logger.info(
        "role limit 4, MAX_CONNS=10: %d served, %d failed in %.2fs; peak %d server "
        "connections; stats %s",
        len(served),
        len(failures),
        monotonic() - started,
        sampler.peak,
        stats,
    )
    assert failures == []
    assert len(served) == 500
    assert 1 <= sampler.peak <= 4
    assert len(set(served)) <= 4 + stats["connections_lost"]
    # Said once, and counted.
    assert stats["connections_capped"] >= 1
    capped = [r for r in caplog.records if "requests queue on those" in r.getMessage()]
    assert len(capped) == stats["connections_capped"]
    assert stats["connections_errors"] >= 1


def _server_pids(cluster: PostgresCluster) -> list[int]:
    """The postmaster and every process it started (backends, background workers)."""
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(entry))
    return pids


@pytest.fixture
def frozen_cluster():
    server = PostgresCluster()
    server.start()
    server.psql("CREATE DATABASE geventpool_test")
    _add_alias(
        "frozen",
        HOST=server.host,
        PORT=str(server.port),
        # A round trip at every checkout: the one a frozen server never answers.
        # POOL_TIMEOUT (which also bounds each connect) is generous, so that the
        # connects hold_all() needs cannot lose a race with it on a loaded machine;
        # the frozen phase shortens the checkout wait to FROZEN_WAIT.
        OPTIONS={"MAX_CONNS": 4, "POOL_TIMEOUT": 10.0, "HEALTH_CHECK_DELAY": 0},
    )
    stopped: list[int] = []
    try:
        yield server, stopped
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        _drop_alias("frozen")
        server.destroy()


def test_a_frozen_server_ends_every_checkout_in_time(frozen_cluster):
    server, stopped = frozen_cluster
    alias = "frozen"

    def hold_all() -> None:
        """Four checkouts at once: the pool opens (or checks) its four connections.

        Not the point of the test: they wait up to the generous POOL_TIMEOUT.
        """
        held = []

        def hold() -> None:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT 1")
            held.append(1)
            wait_until(lambda: len(held) == 4)
            connections[alias].close()

        gevent.joinall([gevent.spawn(hold) for _ in range(4)], raise_error=True)

    hold_all()
    assert get_stats(alias)["pool_available"] == 4
    # SIGSTOP, as a frozen VM or a stuck storage layer looks from the client.
    pids = _server_pids(server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    stopped.extend(pids)

    with checkout_timeout(FROZEN_WAIT, alias):
        jobs = [gevent.spawn(_timed_request, alias) for _ in range(12)]
        gevent.joinall(jobs, timeout=30)
    outcomes = [job.value for job in jobs if job.successful()]
    logger.info(
        "frozen server: %d outcomes, durations %.2f..%.2fs, errors %s",
        len(outcomes),
        min(d for d, _ in outcomes),
        max(d for d, _ in outcomes),
        sorted({f"{type(e).__name__}: {str(e)[:100]}" for _, e in outcomes}),
    )
    assert len(outcomes) == 12
    for duration, error in outcomes:
        assert isinstance(error, OperationalError), error
        assert duration < FROZEN_WAIT + SLACK, duration

    for pid in stopped:
        os.kill(pid, signal.SIGCONT)
    stopped.clear()
    # Thawed: the pool serves again (the connects it started ended at their deadline).
    wait_until(lambda: get_stats(alias)["pool_opening"] == 0)
    hold_all()
    assert get_stats(alias)["pool_size"] <= 4


class _SlowResolver:
    """gevent's resolver, except that one name takes ``delay`` s to resolve (to 127.0.0.1).

    It sits at gevent's own seam (``hub.resolver``), where every lookup made
    through the patched socket module goes: a lookup libpq makes itself (a
    blocking ``getaddrinfo()`` in C) never reaches it.
    """

    def __init__(self, real, name: str, delay: float) -> None:
        self.real = real
        self.name = name
        self.delay = delay
        self.lookups = 0

    def getaddrinfo(self, host, port, *args, **kwargs):
        if host == self.name:
            self.lookups += 1
            gevent.sleep(self.delay)
            host = "127.0.0.1"
        return self.real.getaddrinfo(host, port, *args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self.real, attr)


@pytest.fixture
def slow_name(cluster):
    """A host name whose lookup takes 3 s (cooperatively), then gives the test server."""
    hub = gevent.get_hub()
    real = hub.resolver
    resolver = _SlowResolver(real, "geventpool-slow-dns.invalid", 3.0)
    hub.resolver = resolver
    alias = "slow_dns"
    _add_alias(
        alias,
        HOST=resolver.name,
        PORT=str(cluster.port),
        OPTIONS={"MAX_CONNS": 3, "POOL_TIMEOUT": 1.0, "application_name": "geventpool-slow-dns"},
    )
    try:
        yield alias, resolver
    finally:
        _drop_alias(alias)
        hub.resolver = real


def test_a_slow_name_lookup_neither_blocks_the_process_nor_outlives_the_checkout(slow_name):
    """Host names are looked up through gevent, inside the connect's deadline (both drivers).

    libpq's own lookup (psycopg2) is a blocking getaddrinfo(): a DNS server that
    takes seconds to answer froze every greenlet for that long, and checkouts
    ended long after POOL_TIMEOUT.
    """
    alias, resolver = slow_name
    ticks = []

    def ticker() -> None:
        while True:
            ticks.append(monotonic())
            gevent.sleep(0.05)

    watch = gevent.spawn(ticker)
    try:
        jobs = [gevent.spawn(_timed_request, alias) for _ in range(6)]
        gevent.joinall(jobs, timeout=30)
    finally:
        watch.kill()
    outcomes = [job.value for job in jobs]
    gaps = [ticks[i + 1] - ticks[i] for i in range(len(ticks) - 1)]
    logger.info(
        "slow lookup: outcomes %s; longest pause of the hub %.2fs",
        [(round(d, 2), type(e).__name__) for d, e in outcomes],
        max(gaps),
    )
    # The lookup went through gevent: the process kept running meanwhile.
    assert resolver.lookups >= 1
    # (A blocking lookup would stop the hub for the resolver's 3 s.)
    assert max(gaps) < 1.5
    for duration, error in outcomes:
        assert isinstance(error, OperationalError), error
        assert duration < 1.0 + SLACK, duration
    # The name does resolve, slowly: with time enough the pool connects and serves.
    resolver.delay = 0.2
    wait_until(lambda: _timed_request(alias)[1] is None, timeout=30)
    stats = get_stats(alias)
    assert stats["pool_size"] <= 3


def test_a_query_interrupted_on_a_frozen_server_reaches_the_caller_in_time(frozen_cluster):
    """The cancel of an interrupted query never holds up the caller it interrupted.

    psycopg 3's cancel request waits for the server (up to 5 s, frozen here): run
    in the caller, a ``gevent.Timeout(0.5)`` reached it after 5.5 s. The slot stays
    taken until the cancel is done, so the backend is counted in the cap meanwhile.
    """
    server, stopped = frozen_cluster
    alias = "frozen"
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
    pids = _server_pids(server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    stopped.extend(pids)
    started = monotonic()
    with pytest.raises(gevent.Timeout):
        try:
            with gevent.Timeout(0.5):
                with transaction.atomic(using=alias):
                    with connections[alias].cursor() as cursor:
                        cursor.execute("SELECT 1")
        finally:
            connections[alias].close()
    elapsed = monotonic() - started
    logger.info("interrupted on a frozen server: the caller got its Timeout after %.2fs", elapsed)
    assert elapsed < 0.5 + 1.0
    assert get_stats(alias)["pool_size"] <= 1
    for pid in stopped:
        os.kill(pid, signal.SIGCONT)
    stopped.clear()
    # The cancel ends (answered, or at its own deadline) and frees the slot.
    wait_until(lambda: get_stats(alias)["pool_size"] == 0, timeout=15)
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
    connections[alias].close()


def test_a_timeout_while_connects_hang_names_the_server_not_the_load(silent_listener):
    """Checkouts that time out while every slot is a connect still waiting on the server.

    The message used to blame the load ("raise MAX_CONNS or POOL_TIMEOUT, or give
    connections back sooner") with no connection in use at all.
    """
    server, accepted = silent_listener
    alias = "silent_slow"
    # The connects outlast the checkouts: no connect error is known when they end.
    _add_alias(
        alias,
        HOST="127.0.0.1",
        PORT=str(server.server_port),
        OPTIONS={"MAX_CONNS": 3, "POOL_TIMEOUT": 1.0, "connect_timeout": 4},
    )
    try:
        jobs = [gevent.spawn(_timed_request, alias, None) for _ in range(6)]
        gevent.joinall(jobs, timeout=30)
        errors = [job.value[1] for job in jobs if job.successful()]
        assert len(errors) == 6
        assert all(isinstance(error, OperationalError) for error in errors), errors
        assert accepted
        for error in errors:
            message = str(error)
            assert "raise MAX_CONNS" not in message, message
            assert "0 in use" in message, message
            assert "not answered" in message, message
    finally:
        _drop_alias(alias)


def test_a_frozen_backend_costs_one_connection_not_the_healthy_ones(frozen_cluster):
    """One backend frozen among four idle connections, a round trip at every checkout.

    The checkout that draws it gives that round trip half of its time (other idle
    connections could serve), loses that connection, and is served by the next idle
    one with the other half. It used to spend its whole deadline on the frozen one
    and fail with PoolTimeout while three healthy connections were idle (and, before
    that, to go on checking the others with no time left, discarding them all).
    """
    server, stopped = frozen_cluster
    alias = "frozen"
    held: list[int] = []
    release_order: list[int] = []

    def hold() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        held.append(pid)
        wait_until(lambda: len(held) == 4, timeout=30)
        # Give back in a known order: the frozen one last, so it is reused first (LIFO).
        wait_until(lambda: release_order and release_order[0] == pid, timeout=30)
        connections[alias].close()
        release_order.pop(0)

    workers = [gevent.spawn(hold) for _ in range(4)]
    wait_until(lambda: len(held) == 4, timeout=30)
    frozen_pid = held[0]
    release_order.extend([*held[1:], frozen_pid])
    gevent.joinall(workers, timeout=30, raise_error=True)
    assert get_stats(alias)["pool_available"] == 4
    os.kill(frozen_pid, signal.SIGSTOP)
    stopped.append(frozen_pid)
    before = get_stats(alias)

    started = monotonic()
    try:
        with checkout_timeout(FROZEN_WAIT, alias), connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            served_by = cursor.fetchone()[0]
    finally:
        connections[alias].close()
    elapsed = monotonic() - started
    after = get_stats(alias)
    logger.info("frozen backend: checkout ended after %.2fs; stats %s", elapsed, after)
    assert served_by in held[1:]
    assert elapsed < FROZEN_WAIT + 3  # its own deadline, plus a loaded machine's slack
    assert after["connections_lost"] - before["connections_lost"] == 1
    assert after["checks_roundtrip"] - before["checks_roundtrip"] == 2
    # The three healthy connections are still in the pool, their backends alive.
    healthy = set(held[1:])
    alive = {
        int(pid)
        for pid in server.psql(
            "SELECT pid FROM pg_stat_activity WHERE datname = 'geventpool_test'"
        ).split()
    }
    assert healthy <= alive
