"""What the benchmark compares: each reference's environment, settings and client.

A reference is measured through a `Client` with three verbs, so that every
workload runs the same code against each of them:

* ``acquire()`` gets a connection the way a request would (for Django: the
  greenlet's wrapper, connected), ``query(handle)`` runs the trivial ORM query (or
  the SQL it emits), ``release(handle)`` ends the request the way Django does
  (``close_if_unusable_or_obsolete()``: gives a pooled connection back, keeps a
  held one).

The orchestrator only needs `REFERENCES` (names, virtualenvs, drivers); the
worker process builds the settings and the client, importing Django lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Reference",
    "REFERENCES",
    "MAX_CONNS",
    "QUERY_SQL",
    "django_settings",
    "make_client",
    "raw_connect",
]

# The pool size of every capped reference.
MAX_CONNS = 10
# The SQL that `Item.objects.filter(pk=1).exists()` emits, for the driver-only ceiling.
QUERY_SQL = 'SELECT 1 AS "a" FROM "bench_item" WHERE "bench_item"."id" = %s LIMIT 1'


@dataclass(frozen=True)
class Reference:
    """One contender: where it runs and how it is configured."""

    name: str
    venv: str  # directory name under .venvs/
    driver: str  # "psycopg2" or "psycopg3"
    kind: str  # "raw", "orm_held", "no_pool", "django_pool", "old", "ours"
    description: str
    capped: bool = True  # MAX_CONNS applies (the waiting workload needs a cap)
    options: dict[str, Any] = field(default_factory=dict)
    health_checks: bool = False  # Django's CONN_HEALTH_CHECKS
    # Runs the "requests with an external wait" workload (the references issue 11
    # compares; the variants would only lengthen the run).
    external_wait: bool = True

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name).strip("-")


REFERENCES: dict[str, Reference] = {
    ref.name: ref
    for ref in (
        Reference(
            "raw_limit",
            "bench-psycopg2",
            "psycopg2",
            "raw",
            "psycopg2 (green) connections in a gevent LifoQueue, the SQL the ORM emits, no Django",
            external_wait=False,
        ),
        Reference(
            "orm_held[psycopg2]",
            "bench-psycopg2",
            "psycopg2",
            "orm_held",
            "Django ORM, one connection held per greenlet for the whole run (no pool, no cap)",
            capped=False,
        ),
        Reference(
            "orm_held[psycopg3]",
            "bench-psycopg3",
            "psycopg3",
            "orm_held",
            "Django ORM, one connection held per greenlet for the whole run (no pool, no cap)",
            capped=False,
        ),
        Reference(
            "no_pool",
            "bench-psycopg2",
            "psycopg2",
            "no_pool",
            "Django's stock backend, CONN_MAX_AGE=0: a new connection per request",
            capped=False,
            external_wait=False,
        ),
        Reference(
            "django_pool",
            "bench-psycopg3",
            "psycopg3",
            "django_pool",
            'Django\'s own OPTIONS["pool"] (psycopg_pool), min_size=max_size=10',
        ),
        Reference(
            "django_pool+checks",
            "bench-psycopg3",
            "psycopg3",
            "django_pool",
            'Django\'s own OPTIONS["pool"] with CONN_HEALTH_CHECKS=True',
            health_checks=True,
            external_wait=False,
        ),
        Reference(
            "old_geventpool",
            "bench-old",
            "psycopg2",
            "old",
            "django-db-geventpool 4.0.8 from PyPI, psycopg2 + psycogreen, MAX_CONNS=10",
        ),
        Reference(
            "ours[psycopg3]",
            "bench-psycopg3",
            "psycopg3",
            "ours",
            "this package, psycopg 3, MAX_CONNS=10, HEALTH_CHECK_DELAY default (1 s)",
        ),
        Reference(
            "ours[psycopg3,hc=0]",
            "bench-psycopg3",
            "psycopg3",
            "ours",
            "this package, psycopg 3, MAX_CONNS=10, HEALTH_CHECK_DELAY=0 "
            "(round trip each checkout)",
            options={"HEALTH_CHECK_DELAY": 0},
            external_wait=False,
        ),
        Reference(
            "ours[psycopg3,tx]",
            "bench-psycopg3",
            "psycopg3",
            "ours",
            'this package, psycopg 3, MAX_CONNS=10, POOL_MODE="transaction"',
            options={"POOL_MODE": "transaction"},
        ),
        Reference(
            "ours[psycopg2]",
            "bench-psycopg2",
            "psycopg2",
            "ours",
            "this package, psycopg2 + psycogreen, MAX_CONNS=10, HEALTH_CHECK_DELAY default (1 s)",
        ),
        Reference(
            "ours[psycopg2,hc=0]",
            "bench-psycopg2",
            "psycopg2",
            "ours",
            "this package, psycopg2 + psycogreen, MAX_CONNS=10, HEALTH_CHECK_DELAY=0",
            options={"HEALTH_CHECK_DELAY": 0},
            external_wait=False,
        ),
        Reference(
            "ours[psycopg2,tx]",
            "bench-psycopg2",
            "psycopg2",
            "ours",
            'this package, psycopg2 + psycogreen, MAX_CONNS=10, POOL_MODE="transaction"',
            options={"POOL_MODE": "transaction"},
        ),
    )
}

_ENGINES = {
    ("ours", "psycopg3"): "django_db_geventpool.backends.postgresql_psycopg3",
    ("ours", "psycopg2"): "django_db_geventpool.backends.postgresql_psycopg2",
    # The old package's module name; its venv has the old package, not ours.
    ("old", "psycopg2"): "django_db_geventpool.backends.postgresql_psycopg2",
}


def django_settings(ref: Reference, db: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``settings.configure()`` for ``ref`` on database ``db``."""
    options: dict[str, Any] = {"application_name": "bench-" + ref.slug}
    conn_max_age: int | None = 0
    if ref.kind in ("ours", "old"):
        options["MAX_CONNS"] = MAX_CONNS
        if ref.kind == "ours":
            options["POOL_TIMEOUT"] = 120.0
        options.update(ref.options)
    elif ref.kind == "django_pool":
        options["pool"] = {"min_size": MAX_CONNS, "max_size": MAX_CONNS, "timeout": 120.0}
    elif ref.kind == "orm_held":
        conn_max_age = None
    engine = _ENGINES.get((ref.kind, ref.driver), "django.db.backends.postgresql")
    return {
        "DEBUG": False,
        "SECRET_KEY": "bench-only",
        "USE_TZ": True,
        "TIME_ZONE": "UTC",
        "INSTALLED_APPS": ["bench.benchapp.apps.BenchAppConfig"],
        "DATABASES": {
            "default": {
                "ENGINE": engine,
                "NAME": db["NAME"],
                "USER": db["USER"],
                "PASSWORD": db["PASSWORD"],
                "HOST": db["HOST"],
                "PORT": db["PORT"],
                "CONN_MAX_AGE": conn_max_age,
                "CONN_HEALTH_CHECKS": ref.health_checks,
                "OPTIONS": options,
            }
        },
    }


class DjangoClient:
    """A request through Django: connect on first use, the ORM query, request end."""

    def __init__(self) -> None:
        from django.db import connections

        from bench.benchapp.models import Item

        self._connections = connections
        self._item = Item

    def prepare(self) -> None:
        # Create this greenlet's DatabaseWrapper outside the measured part.
        self._connections["default"]

    def acquire(self) -> Any:
        wrapper = self._connections["default"]
        wrapper.ensure_connection()
        return wrapper

    def query(self, handle: Any) -> None:
        self._item.objects.filter(pk=1).exists()

    def release(self, handle: Any) -> None:
        handle.close_if_unusable_or_obsolete()

    def finish(self) -> None:
        """A greenlet is done: close what it holds (held connections)."""
        self._connections["default"].close()

    def close(self) -> None:
        self._connections.close_all()


class RawClient:
    """The driver alone: ``MAX_CONNS`` connections in a gevent queue (the ceiling)."""

    def __init__(self, driver: str, dsn: str, size: int) -> None:
        from gevent.queue import LifoQueue

        # LIFO, like the pools: the most recently used connection (and server
        # process) is the warm one; a FIFO would rotate through all of them.
        self._queue: LifoQueue = LifoQueue()
        self._conns = [raw_connect(driver, dsn) for _ in range(size)]
        for conn in self._conns:
            self._queue.put(conn)

    def prepare(self) -> None:
        pass

    def acquire(self) -> Any:
        return self._queue.get()

    def query(self, conn: Any) -> None:
        with conn.cursor() as cursor:
            cursor.execute(QUERY_SQL, (1,))
            cursor.fetchone()

    def release(self, conn: Any) -> None:
        self._queue.put(conn)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


def raw_connect(driver: str, dsn: str) -> Any:
    """A driver connection outside any pool, in autocommit (raw_limit's, the sampler's)."""
    if driver == "psycopg3":
        import psycopg

        return psycopg.connect(dsn, autocommit=True)
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    return conn


def make_client(ref: Reference, dsn: str) -> DjangoClient | RawClient:
    if ref.kind == "raw":
        return RawClient(ref.driver, f"{dsn} application_name=bench-{ref.slug}", MAX_CONNS)
    return DjangoClient()
