"""A server that stops accepting writes without dropping connections is left.

``ALTER SYSTEM SET default_transaction_read_only = on`` + ``pg_reload_conf()`` on a
running server, under a write load, for an alias whose ``OPTIONS`` ask for a
writable server (``target_session_attrs = "read-write"``), alone and with a peer.

What the server does (observed on PostgreSQL 15, both drivers): an idle
connection learns nothing at the reload. The backend applies the new setting when
it reads its next statement, runs that statement with it (a write fails with
SQLSTATE 25006) and reports ``default_transaction_read_only = on`` in a
ParameterStatus message sent with that statement's answer. So the first statement
on each connection after the switch may fail; from then on the driver knows,
locally, and the pool never hands that connection out again (nor any new one to
that server). Each write below records what its connection had reported *before*
the write: no write may run on a connection whose server had already said it was
read-only.
"""

from __future__ import annotations

import logging
from time import monotonic

import gevent
import pytest
from django.core.management import call_command
from django.db import DatabaseError, connections

from django_db_geventpool import PoolTimeout, get_stats
from django_db_geventpool.backends.drivers import driver_ops
from tests.support.eventually import wait_until
from tests.support.helpers import database_entry, drop_alias, sqlstate
from tests.support.pgserver import PostgresCluster
from tests.testapp.models import Item

logger = logging.getLogger(__name__)

TEST_DB = "geventpool_test"
CHECK_INTERVAL = 1.0
MAX_CONNS = 4
# After a switch, by when every connection has learned of it (one statement each,
# once the server has applied its reload): CHECK_INTERVAL plus generous slack,
# since on a loaded machine the postmaster's reload and the requests run late.
SETTLE = CHECK_INTERVAL + 3
SINGLE, PEERED, PEER_B = "ro_single", "ro_peered", "ro_b"


def _entry(cluster: PostgresCluster, **options) -> dict:
    return database_entry(cluster.socket_dir, cluster.port, "geventpool-read-only", **options)


def set_read_only(cluster: PostgresCluster, on: bool) -> None:
    if on:
        cluster.psql("ALTER SYSTEM SET default_transaction_read_only = on")
    else:
        cluster.psql("ALTER SYSTEM RESET default_transaction_read_only")
    cluster.psql("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def clusters():
    started = [PostgresCluster(), PostgresCluster()]
    try:
        for cluster in started:
            cluster.start()
            cluster.psql(f"CREATE DATABASE {TEST_DB}")
        a, b = started
        connections.settings["ro_a"] = _entry(a)
        connections.settings[PEER_B] = _entry(b)
        for alias in ("ro_a", PEER_B):
            call_command("migrate", database=alias, run_syncdb=True, verbosity=0)
            connections[alias].close()
            connections[alias].close_pool()
        yield a, b
    finally:
        for alias in ("ro_a", PEER_B, SINGLE, PEERED):
            drop_alias(alias)
        for cluster in started:
            cluster.destroy()


@pytest.fixture
def writable(clusters):
    """Both servers writable when the test starts and when it ends."""
    for cluster in clusters:
        set_read_only(cluster, False)
    yield clusters
    for cluster in clusters:
        set_read_only(cluster, False)
    for alias in (SINGLE, PEERED):
        drop_alias(alias)


class WriteLoad:
    """Greenlets writing one row per request; each outcome with what its connection knew."""

    def __init__(self, alias: str, greenlets: int = 8) -> None:
        self.alias = alias
        # (started, port or None, error or None, read-only reported before the write)
        self.outcomes: list[tuple[float, str | None, BaseException | None, bool]] = []
        self._running = True
        self._greenlets = [gevent.spawn(self._run) for _ in range(greenlets)]

    def _write(self) -> None:
        connection = connections[self.alias]
        started = monotonic()
        port, reported, error = None, False, None
        try:
            connection.ensure_connection()
            raw = connection.connection
            reported = driver_ops().read_only(raw)
            port = str(raw.info.port)
            Item.objects.using(self.alias).create(name="read-only-test", value=1)
        except DatabaseError as exc:
            error = exc
        finally:
            connection.close()
        self.outcomes.append((started, port, error, reported))

    def _run(self) -> None:
        while self._running:
            self._write()
            gevent.sleep(0.003)

    def stop(self) -> None:
        self._running = False
        gevent.joinall(self._greenlets, timeout=30, raise_error=True)
        assert all(g.dead for g in self._greenlets)

    def count(self, since: float = 0.0) -> int:
        return sum(1 for o in self.outcomes if o[0] > since)

    def successes(self, since: float = 0.0) -> int:
        return sum(1 for o in self.outcomes if o[0] > since and o[2] is None)

    def errors(self, since: float = 0.0, until: float = float("inf")) -> list[BaseException]:
        return [e for s, _, e, _ in self.outcomes if e is not None and since < s <= until]

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, error, _ in self.outcomes:
            key = "ok" if error is None else f"{type(error).__name__} {sqlstate(error)}"
            counts[key] = counts.get(key, 0) + 1
        return counts


def test_a_lone_server_turned_read_only_is_no_longer_handed_out(writable):
    a, _ = writable
    connections.settings[SINGLE] = _entry(
        a,
        MAX_CONNS=MAX_CONNS,
        POOL_TIMEOUT=1.5,
        CHECK_INTERVAL=CHECK_INTERVAL,
        target_session_attrs="read-write",
    )
    load = WriteLoad(SINGLE)
    try:
        wait_until(lambda: load.count() >= 100, timeout=60)
        set_read_only(a, True)
        switched = monotonic()
        # Read-only for SETTLE and 3 s more: in those 3 s checkouts (POOL_TIMEOUT
        # 1.5 s) wait and time out.
        wait_until(lambda: monotonic() > switched + SETTLE + 3, timeout=60)
        set_read_only(a, False)
        writable_again = monotonic()
        # Writable again: writes succeed again, and go on succeeding.
        wait_until(lambda: load.successes(since=writable_again) >= 100, timeout=60)
    finally:
        load.stop()
    read_only_failures = [
        e for s, _, e, _ in load.outcomes if e is not None and sqlstate(e) == "25006"
    ]
    late = load.errors(since=switched + SETTLE, until=writable_again)
    stats = get_stats(SINGLE)
    logger.info(
        "read-only, alone: %s; 25006 failures %d; errors after SETTLE: %s; stats %s",
        load.summary(),
        len(read_only_failures),
        sorted({f"{type(e).__name__}: {str(e)[:160]}" for e in late}),
        stats,
    )
    # Never a write on a connection whose server had said it was read-only.
    assert not any(reported for *_, reported in load.outcomes)
    # At most one refused write per connection (the statement that brought the news).
    assert len(read_only_failures) <= MAX_CONNS
    assert stats["connections_read_only"] >= 1
    # Later: no writable server, so checkouts wait and time out saying why.
    assert late, "no checkout timed out while the server was read-only"
    assert all(isinstance(e, PoolTimeout) for e in late)
    assert all("read-only" in str(e) for e in late)
    assert not any(sqlstate(e) == "25006" for e in late)
    # Writable again: the latest writes all succeeded (counted, not timed: how soon
    # the pool's next connect comes depends on its backoff and on the machine).
    tail = sorted(load.outcomes, key=lambda outcome: outcome[0])[-50:]
    assert all(error is None for _, _, error, _ in tail), load.summary()


def test_a_peer_turned_read_only_is_left_for_a_writable_peer(writable):
    a, b = writable
    connections.settings[PEERED] = {
        **_entry(
            a,
            MAX_CONNS=MAX_CONNS,
            POOL_TIMEOUT=5.0,
            CHECK_INTERVAL=CHECK_INTERVAL,
            target_session_attrs="read-write",
        ),
        "PEERS": [PEER_B],
    }
    load = WriteLoad(PEERED)
    try:
        wait_until(lambda: load.count() >= 100, timeout=60)
        assert {p for _, p, e, _ in load.outcomes if e is None} == {str(a.port), str(b.port)}
        set_read_only(a, True)
        switched = monotonic()
        wait_until(lambda: load.count(since=switched + SETTLE) >= 300, timeout=60)
        stats = get_stats(PEERED)
    finally:
        load.stop()
    read_only_failures = [
        e for s, _, e, _ in load.outcomes if e is not None and sqlstate(e) == "25006"
    ]
    logger.info(
        "read-only peer: %s; 25006 failures %d (last %.2fs after the switch); stats %s",
        load.summary(),
        len(read_only_failures),
        max((s - switched for s, _, e, _ in load.outcomes if e is not None), default=0.0),
        {k: v for k, v in stats.items() if k.startswith("peer.") or "read_only" in k},
    )
    assert not any(reported for *_, reported in load.outcomes)
    assert len(read_only_failures) <= MAX_CONNS
    others = [e for e in load.errors() if sqlstate(e) != "25006"]
    assert not others, sorted({f"{type(e).__name__}: {str(e)[:300]}" for e in others})
    # Errors stop within SETTLE; writes go to the writable peer.
    assert load.errors(since=switched + SETTLE) == []
    after = [p for s, p, e, _ in load.outcomes if s > switched + SETTLE]
    assert set(after) == {str(b.port)}
    assert stats[f"peer.{PEERED}.up"] == 0
    assert stats["connections_read_only"] >= 1
