"""Test helpers: raw driver connections, a server-side connection sampler."""

from __future__ import annotations

import gevent

from tests.settings.base import TEST_APPLICATION_NAME


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


class ServerConnectionSampler:
    """Counts the pool's server connections every few ms, on its own connection."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: list[int] = []
        self._conn = raw_connect()
        self._greenlet: gevent.Greenlet | None = None
        self._stopping = False

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    def _run(self) -> None:
        while not self._stopping:
            self.samples.append(len(pool_backends(self._conn)))
            gevent.sleep(self.interval)

    def __enter__(self) -> "ServerConnectionSampler":
        self._greenlet = gevent.spawn(self._run)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._greenlet is not None
        # Stop between samples: a kill during a query would leave the
        # connection busy for the last sample below.
        self._stopping = True
        self._greenlet.join()
        self.samples.append(len(pool_backends(self._conn)))
        self._conn.close()
