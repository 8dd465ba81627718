"""A storm of greenlets interrupted inside atomic(): the caller sees the interruption itself.

Each greenlet writes two rows of one tag in a transaction, with a server-side
sleep between them and a deferred trigger that makes the COMMIT take a few
milliseconds too, under a ``gevent.Timeout`` of random length; others are killed
at random moments. An interrupted query leaves its connection closed (psycopg2) or
in ACTIVE state (psycopg 3); Django's ``atomic()`` exit then tries a rollback and
restores autocommit on it. What must reach the caller is the ``Timeout`` or the
kill, never an ``InterfaceError`` / ``ProgrammingError`` from that clean-up; no
transaction is half committed, and every slot comes back.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

import gevent
import pytest
from django.db import connection, transaction
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from django_db_geventpool import get_stats
from tests.support.eventually import wait_until
from tests.support.helpers import ServerConnectionSampler, interrupt_while_running

logger = logging.getLogger(__name__)

MAX_CONNS = 8
WAVES = 6
PER_WAVE = 100


class Killed(BaseException):
    """What the killer greenlet throws into a worker (a kill, as gevent delivers it)."""


@pytest.fixture
def storm_table():
    """A table whose rows are checked by a deferred trigger that sleeps at COMMIT."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE storm_rows (tag text NOT NULL, n int NOT NULL);"
            "CREATE FUNCTION storm_slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(random() * 0.004); RETURN NULL; END $$;"
            "CREATE CONSTRAINT TRIGGER storm_slow_commit AFTER INSERT ON storm_rows "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION storm_slow_commit();"
        )
    connection.close()
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE storm_rows; DROP FUNCTION storm_slow_commit()")
        connection.close()


def _transfer(tag: str, pause: float) -> None:
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO storm_rows VALUES (%s, 1)", [tag])
            cursor.execute("SELECT pg_sleep(%s)", [pause])
            cursor.execute("INSERT INTO storm_rows VALUES (%s, 2)", [tag])


def test_interrupted_atomic_blocks_raise_the_interruption_itself(configure_pool, storm_table):
    configure_pool(MAX_CONNS=MAX_CONNS, POOL_TIMEOUT=30)
    rng = random.Random(9)
    outcomes: dict[str, BaseException | None] = {}
    timeouts: dict[str, gevent.Timeout] = {}

    def worker(tag: str, deadline: float | None, pause: float) -> None:
        timeout = gevent.Timeout(deadline) if deadline is not None else None
        if timeout is not None:
            timeouts[tag] = timeout
            timeout.start()
        outcome: BaseException | None = None
        try:
            _transfer(tag, pause)
        except BaseException as exc:
            outcome = exc
        finally:
            if timeout is not None:
                timeout.close()
            try:
                connection.close()
            except BaseException as exc:
                outcome = outcome or exc
            outcomes[tag] = outcome

    pool_sizes: list[int] = []

    def sample_pool() -> None:
        while True:
            pool_sizes.append(get_stats()["pool_size"])
            gevent.sleep(0.005)

    pool_sampler = gevent.spawn(sample_pool)
    with ServerConnectionSampler(interval=0.02) as sampler:
        for wave in range(WAVES):
            greenlets = []
            for number in range(PER_WAVE):
                tag = f"storm-{wave}-{number}"
                deadline = rng.uniform(0.001, 0.03) if rng.random() < 0.6 else None
                greenlet = gevent.spawn(worker, tag, deadline, rng.uniform(0.0, 0.01))
                greenlets.append(greenlet)
                if rng.random() < 0.4:
                    gevent.spawn_later(rng.uniform(0.0, 0.04), greenlet.kill, Killed, block=False)
            gevent.joinall(greenlets, timeout=60)
            assert all(g.dead for g in greenlets)
    pool_sampler.kill()
    expected = [Killed, gevent.Timeout]
    kinds = Counter(type(o).__name__ if o is not None else "committed" for o in outcomes.values())
    # A kill that lands outside the worker's try (before it starts) leaves no outcome.
    wrong = {
        tag: outcome
        for tag, outcome in outcomes.items()
        if outcome is not None and not isinstance(outcome, tuple(expected))
    }
    foreign_timeouts = [
        tag
        for tag, outcome in outcomes.items()
        if isinstance(outcome, gevent.Timeout) and outcome is not timeouts.get(tag)
    ]
    logger.info(
        "interruption storm: outcomes %s, wrong %s",
        dict(kinds),
        Counter(
            f"{type(o).__name__}: {str(o).splitlines()[0] if str(o) else ''}"
            for o in wrong.values()
        ),
    )
    assert wrong == {}
    assert foreign_timeouts == []
    assert kinds["Timeout"] > 0 and kinds["Killed"] > 0 and kinds["committed"] > 0
    # No half-committed transaction: each tag has both rows or none.
    with connection.cursor() as cursor:
        cursor.execute("SELECT tag, count(*) FROM storm_rows GROUP BY tag")
        rows = dict(cursor.fetchall())
    connection.close()
    assert set(rows.values()) <= {2}, {t: n for t, n in rows.items() if n != 2}
    assert len(rows) >= kinds["committed"]
    # Every slot back, never more than MAX_CONNS server connections.
    wait_until(lambda: get_stats()["pool_size"] == get_stats()["pool_available"], timeout=10)
    stats = get_stats()
    assert stats["requests_waiting"] == 0
    assert max(pool_sizes) <= MAX_CONNS
    if is_psycopg3:
        # The server side too: a query interrupted on psycopg 3 is cancelled
        # before its connection is closed. psycopg2 closes the connection itself
        # when its wait is interrupted (nothing left to cancel with), so its
        # server backend may outlive the slot for as long as the query runs.
        assert sampler.peak <= MAX_CONNS

    holding = []

    def hold() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            holding.append(1)
            wait_until(lambda: len(holding) == MAX_CONNS)
        finally:
            connection.close()

    gevent.joinall([gevent.spawn(hold) for _ in range(MAX_CONNS)], timeout=20, raise_error=True)
    assert len(holding) == MAX_CONNS


def test_an_interrupted_long_query_leaves_no_server_connection_beyond_the_cap(configure_pool):
    """Six long queries, each interrupted, one after the other, with MAX_CONNS=2.

    The pool frees an interrupted connection's slot at once; the query must not run
    on in the server meanwhile, or the next connections add up beyond the cap.
    psycopg 3 cancels it on return; psycopg2 cannot without blocking the hub, so
    its sessions ask the server to end a query whose client went away
    (``client_connection_check_interval``). Before that, six backends of a
    two-connection pool ran their ``pg_sleep(60)`` to the end.
    """
    configure_pool(MAX_CONNS=2, POOL_TIMEOUT=10.0)
    interrupted = 0
    with ServerConnectionSampler(interval=0.05) as sampler:
        for _ in range(6):
            try:
                with gevent.Timeout(0.5):
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_sleep(60)")
            except gevent.Timeout:
                interrupted += 1
            finally:
                connection.close()
        sampler.stop()
        # Generous: the server checks every second; a loaded machine may add more.
        left = sampler.wait_for(0, timeout=20)
    logger.info("interrupted long queries: peak %d server connections", sampler.peak)
    assert interrupted == 6
    assert left == 0
    # Each backend ended about a check interval after its query was interrupted.
    assert sampler.peak < 6
    assert get_stats()["pool_size"] == 0


def test_a_caught_interruption_outside_atomic_leaves_the_request_a_working_connection(
    configure_pool,
):
    """Session mode: a ``gevent.Timeout`` caught around a statement, and the request goes on.

    The interrupted connection is given back to be closed (its query cancelled, or
    ended by the server), never reused; the request's next statement checks out
    another and works, even with MAX_CONNS=1. Before, the wrapper kept the
    interrupted connection and every later statement of the request failed
    ("another command is already in progress" / "connection already closed").
    """
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=10.0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        first = cursor.fetchone()[0]
    connection.close()
    after = {}

    def request():
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(30)")
        except gevent.Timeout:
            after["wrapper holds"] = connection.connection is not None
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                after["pid"] = cursor.fetchone()[0]
        finally:
            connection.close()

    interrupted = interrupt_while_running(request, "SELECT pg_sleep(30)")
    assert after["wrapper holds"] is False
    assert after["pid"] not in (first, interrupted)
    stats = get_stats()
    assert stats["returns_bad"] == 1
    assert stats["pool_size"] - stats["pool_available"] == 0
