"""High availability for real: a primary, a streaming standby, a promotion under write load.

A real primary and a real standby (``pg_basebackup -R``). The alias asks for a
writable server (``target_session_attrs = "read-write"``) and knows both, either
as ``PEERS`` or as libpq's multi-host ``HOST``/``PORT``. Under write load the
primary is stopped and the standby promoted: no write fails for requests started
more than ``CHECK_INTERVAL`` + 3 s after the promotion (generous: on a loaded machine
the pool's next connect, after its backoff, may come late), no checkout fails
(``POOL_TIMEOUT`` outlasts the outage), and no write ever lands on a read-only
server (it would fail with SQLSTATE 25006: none does).
"""

from __future__ import annotations

import logging
from time import monotonic

import gevent
import pytest
from django.core.management import call_command
from django.db import DatabaseError, connections

from django_db_geventpool import get_stats
from tests.support.eventually import wait_until
from tests.support.helpers import database_entry, drop_alias, sqlstate
from tests.support.pgserver import PostgresCluster
from tests.testapp.models import Item

logger = logging.getLogger(__name__)

TEST_DB = "geventpool_test"
CHECK_INTERVAL = 1.0
# After the promotion, from when no write may fail (see the module docstring).
SETTLE = CHECK_INTERVAL + 3
# Longer than stopping the primary and promoting the standby take on a loaded machine.
POOL_TIMEOUT = 30.0
HA, STANDBY = "ha", "ha_standby"


@pytest.fixture
def primary_and_standby():
    primary = PostgresCluster()
    standby = None
    try:
        primary.start()
        primary.psql(f"CREATE DATABASE {TEST_DB}")
        connections.settings["ha_setup"] = _entry(primary.socket_dir, str(primary.port))
        call_command("migrate", database="ha_setup", run_syncdb=True, verbosity=0)
        drop_alias("ha_setup")
        standby = PostgresCluster.standby_of(primary)
        standby.start()
        yield primary, standby
    finally:
        for alias in ("ha_setup", HA, STANDBY):
            drop_alias(alias)
        for cluster in (standby, primary):
            if cluster is not None:
                cluster.destroy()


def _entry(host: str, port: str, **options) -> dict:
    return database_entry(host, port, "geventpool-failover", **options)


class WriteLoad:
    """Greenlets writing one row per request: (started, port of the server, error)."""

    def __init__(self, alias: str, greenlets: int = 8) -> None:
        self.alias = alias
        self.outcomes: list[tuple[float, str | None, BaseException | None]] = []
        # Errors raised by the checkout itself (no connection was handed out).
        self.checkout_errors: list[tuple[float, BaseException]] = []
        self._running = True
        self._greenlets = [gevent.spawn(self._run) for _ in range(greenlets)]

    def _write(self) -> None:
        connection = connections[self.alias]
        started = monotonic()
        port, error = None, None
        try:
            try:
                connection.ensure_connection()
            except DatabaseError as exc:
                self.checkout_errors.append((started, exc))
                raise
            port = str(connection.connection.info.port)
            Item.objects.using(self.alias).create(name="failover", value=1)
        except DatabaseError as exc:
            error = exc
        finally:
            connection.close()
        self.outcomes.append((started, port, error))

    def _run(self) -> None:
        while self._running:
            self._write()
            gevent.sleep(0.003)

    def stop(self) -> None:
        self._running = False
        gevent.joinall(self._greenlets, timeout=30, raise_error=True)
        assert all(g.dead for g in self._greenlets)

    def count(self, since: float = 0.0) -> int:
        return sum(1 for s, _, _ in self.outcomes if s > since)


def _fail_over(load: WriteLoad, primary: PostgresCluster, standby: PostgresCluster) -> float:
    """Stop the primary and promote the standby under the load; when the promotion ended."""
    wait_until(lambda: load.count() >= 100, timeout=60)
    stopping = gevent.spawn(primary.stop, "fast")
    stopping.get(timeout=60)
    standby.promote()
    promoted = monotonic()
    wait_until(lambda: load.count(since=promoted + SETTLE) >= 300, timeout=90)
    return promoted


def _check(load: WriteLoad, promoted: float, primary, standby, what: str) -> None:
    failures = [(s, e) for s, _, e in load.outcomes if e is not None]
    late = [e for s, e in failures if s > promoted + SETTLE]
    served = {p for s, p, e in load.outcomes if e is None}
    logger.info(
        "failover (%s): %d writes, %d failed (%s), last failure %.2fs after the promotion; "
        "served by ports %s; stats %s",
        what,
        len(load.outcomes),
        len(failures),
        sorted(
            {
                f"{type(e).__name__} {sqlstate(e)}: {str(e).splitlines()[0][:120]}"
                for _, e in failures
            }
        ),
        max((s - promoted for s, _ in failures), default=float("nan")),
        sorted(served),
        {k: v for k, v in get_stats(HA).items() if k.startswith("peer.") or "connections" in k},
    )
    assert late == [], late[:3]
    # Requests that started while no server accepted writes waited: only queries
    # running on the primary when it stopped failed, never a checkout.
    assert load.checkout_errors == [], load.checkout_errors[:3]
    # No write ever reached a read-only server (it would have failed with 25006).
    assert not any(sqlstate(e) == "25006" for _, e in failures)
    assert served == {str(primary.port), str(standby.port)}
    after = {p for s, p, e in load.outcomes if s > promoted + SETTLE}
    assert after == {str(standby.port)}


def test_promotion_with_peers(primary_and_standby):
    primary, standby = primary_and_standby
    connections.settings[STANDBY] = _entry(standby.socket_dir, str(standby.port))
    connections.settings[HA] = {
        **_entry(
            primary.socket_dir,
            str(primary.port),
            MAX_CONNS=4,
            POOL_TIMEOUT=POOL_TIMEOUT,
            CHECK_INTERVAL=CHECK_INTERVAL,
            target_session_attrs="read-write",
        ),
        "PEERS": [STANDBY],
    }
    load = WriteLoad(HA)
    try:
        promoted = _fail_over(load, primary, standby)
    finally:
        load.stop()
    _check(load, promoted, primary, standby, "PEERS")


def test_promotion_with_libpq_multi_host(primary_and_standby):
    primary, standby = primary_and_standby
    connections.settings[HA] = _entry(
        "127.0.0.1,127.0.0.1",
        f"{primary.port},{standby.port}",
        MAX_CONNS=4,
        POOL_TIMEOUT=POOL_TIMEOUT,
        CHECK_INTERVAL=CHECK_INTERVAL,
        target_session_attrs="read-write",
        connect_timeout=2,
    )
    load = WriteLoad(HA)
    try:
        promoted = _fail_over(load, primary, standby)
    finally:
        load.stop()
    _check(load, promoted, primary, standby, "multi-host HOST")
