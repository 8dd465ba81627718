"""Test helpers: raw driver connections, server-side views of the pool, a sampler."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic

import gevent

from tests.settings.base import TEST_APPLICATION_NAME
from tests.support.eventually import wait_until


def raw_connect(dbname: str = "geventpool_test", **extra):
    """A driver connection outside the pool (autocommit), with the driver Django loaded."""
    from django.db import connections

    params = connections["default"].get_connection_params()
    params.pop("context", None)
    params.pop("cursor_factory", None)
    params.pop("prepare_threshold", None)
    params.update(dbname=dbname, application_name="geventpool-test-observer", **extra)
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if is_psycopg3:
        import psycopg

        return psycopg.connect(autocommit=True, **params)
    import psycopg2

    conn = psycopg2.connect(**params)
    conn.autocommit = True
    return conn


def query(conn, sql: str, params=None):
    cursor = conn.cursor()
    try:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else None
    finally:
        cursor.close()


def pool_backends(conn, state: str | None = None) -> list[tuple]:
    """(pid, state) of the pool's server connections, seen by pg_stat_activity."""
    sql = "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s"
    args: list = [TEST_APPLICATION_NAME]
    if state is not None:
        sql += " AND state = %s"
        args.append(state)
    return query(conn, sql, args)


def pool_pids(conn, state: str | None = None) -> set[int]:
    """The backend pids of the pool's server connections (in ``state``, if given)."""
    return {pid for pid, _ in pool_backends(conn, state)}


def running(conn, sql: str, application_name: str = TEST_APPLICATION_NAME) -> set[int]:
    """Pids of the backends (of ``application_name``) running exactly ``sql`` right now."""
    return {
        pid
        for (pid,) in query(
            conn,
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'active'"
            " AND query = %s",
            [application_name, sql],
        )
    }


def wait_until_running(conn, sql: str, count: int = 1, timeout: float = 30.0) -> set[int]:
    """Wait until ``count`` pooled backends run ``sql`` (the query is in flight); their pids."""
    wait_until(lambda: len(running(conn, sql)) >= count, timeout=timeout)
    return running(conn, sql)


def interrupt_while_running(request, sql: str) -> int:
    """Run ``request`` in a greenlet; throw a ``gevent.Timeout`` into it while ``sql`` runs.

    The timeout lands once the server shows the query running (however slow the
    machine), in the greenlet itself, as a caught ``gevent.Timeout`` would. Returns
    once ``request`` has ended and the interrupted backend is gone (psycopg 3
    cancels it; psycopg2's server notices the closed socket); its pid.
    """
    greenlet = gevent.spawn(request)
    observer = raw_connect()
    try:
        (interrupted,) = wait_until_running(observer, sql)
        greenlet.kill(gevent.Timeout(), block=False)
        greenlet.get(timeout=30)
        wait_until_gone(observer, interrupted)
    finally:
        observer.close()
    return interrupted


def wait_until_gone(conn, *pids: int, timeout: float = 30.0) -> None:
    """Wait until no backend of the server (of any application) has one of ``pids``."""
    gone = set(pids)

    def none_listed() -> bool:
        return not gone & {pid for (pid,) in query(conn, "SELECT pid FROM pg_stat_activity")}

    wait_until(none_listed, timeout=timeout)


def terminate_backend(*pids: int) -> None:
    """``pg_terminate_backend`` each pid from a fresh observer; return once all are gone."""
    observer = raw_connect()
    try:
        for pid in pids:
            assert query(observer, "SELECT pg_terminate_backend(%s)", [pid]) == [(True,)], pid
        wait_until_gone(observer, *pids)
    finally:
        observer.close()


def backend_pid(alias: str = "default") -> int:
    """The server pid of ``alias``'s connection (checked out if needed, kept)."""
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def request_pid(alias: str = "default") -> int:
    """One request: check out, read the server pid, give the connection back."""
    from django.db import connections

    try:
        return backend_pid(alias)
    finally:
        connections[alias].close()


@contextmanager
def checkout_timeout(seconds: float, alias: str = "default") -> Iterator[None]:
    """Checkouts of ``alias``'s pool (created if needed, no I/O) wait ``seconds`` in the block.

    Changes the pool's checkout wait only: each connect stays bounded by the
    configured POOL_TIMEOUT (or libpq's connect_timeout). For a test whose point is
    a checkout that times out, configure a generous POOL_TIMEOUT, open the
    connections the test needs, and shorten the wait only around that checkout: a
    short POOL_TIMEOUT from the start makes every connect race it, and a loaded
    machine loses that race. The other way round, a block that needs connects
    under a short configured POOL_TIMEOUT can lengthen the wait.
    """
    from django.db import connections

    pool = connections[alias].geventpool
    assert pool is not None, alias
    saved = pool.timeout
    pool.timeout = seconds
    try:
        yield
    finally:
        pool.timeout = saved


class ServerConnectionSampler:
    """Counts the server connections of one ``application_name`` every ``interval`` s.

    Samples on a connection of its own, in a greenlet, between `start` and `stop`
    (or for the ``with`` block, which also closes that connection). `stop`
    re-raises a failed sample: a failure must fail the test, not silently
    shorten the series.
    """

    def __init__(
        self, application_name: str = TEST_APPLICATION_NAME, interval: float = 0.005
    ) -> None:
        self.application_name = application_name
        self.interval = interval
        self.samples: list[int] = []
        self._conn = raw_connect()
        self._greenlet: gevent.Greenlet | None = None
        self._stopping = False

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    def count(self) -> int:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        return query(self._conn, sql, [self.application_name])[0][0]

    def _run(self) -> None:
        while not self._stopping:
            self.samples.append(self.count())
            gevent.sleep(self.interval)

    def start(self) -> None:
        assert self._greenlet is None, "already sampling"
        self._stopping = False
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop sampling (if started), re-raising a failed sample; take a last sample."""
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is None:
            return
        # Stop between samples, not kill(): a kill during a query would leave
        # the connection busy (or broken) for the last sample below.
        self._stopping = True
        greenlet.get()
        self.samples.append(self.count())

    def wait_for(self, expected: int, timeout: float = 30.0) -> int:
        """The count once it equals ``expected``, or the last count seen at the deadline."""
        assert self._greenlet is None, "stop sampling first: they share a connection"
        deadline = monotonic() + timeout
        while True:
            count = self.count()
            if count == expected or monotonic() > deadline:
                return count
            gevent.sleep(0.05)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._conn.close()

    def __enter__(self) -> ServerConnectionSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def database_entry(host: str, port: str | int, application_name: str, **options) -> dict:
    """A complete DATABASES entry (the default's, as Django configured it) for a server.

    Same test database name; ``options`` join ``OPTIONS`` (pool options included).
    """
    from django.db import connections

    default = connections.settings["default"]
    return {
        **default,
        "NAME": "geventpool_test",
        "HOST": host,
        "PORT": str(port),
        "OPTIONS": {"application_name": application_name, **options},
        "TEST": {**default.get("TEST", {})},
    }


def drop_alias(alias: str) -> None:
    """Close an alias added by a test (its connection and pool) and forget it."""
    from django.db import connections

    if alias in connections.settings:
        connections[alias].close()
        connections[alias].close_pool()
        del connections[alias]
        del connections.settings[alias]


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of the driver error behind a Django database error (either driver)."""
    cause = error.__cause__
    return getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
