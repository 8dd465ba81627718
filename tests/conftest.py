"""Boots a throwaway PostgreSQL, then Django on top of it, for the tests that need them.

Run the suite under the gevent monkey launcher (``make test`` does):
``python -m gevent.monkey --module pytest``. The settings module comes from
``DJANGO_SETTINGS_MODULE`` (default ``tests.settings.psycopg3``).

The server starts when the first test module outside ``tests/unit/`` is collected
(before it is imported, since test modules import models), so ``pytest tests/unit``
starts no PostgreSQL at all. ``tests/unit/conftest.py`` replaces the per-test pool
fixture with one that touches no database.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import gevent
import gevent.monkey
import pytest

from tests.support import hangs
from tests.support.pgserver import PostgresCluster, ServerBinariesMissing

TEST_DB = "geventpool_test"
UNIT_DIR = Path(__file__).parent / "unit"
# Set to make starting the server an error: the proof that the unit tests need none.
NO_SERVER_ENV = "GEVENTPOOL_TEST_NO_SERVER"

# The per-test timeout (``timeout`` in pyproject.toml) fails a hung test in its own
# greenlet, with the stacks of all greenlets: see tests/support/hangs.py.
pytest_timeout_set_timer = hangs.pytest_timeout_set_timer

# One server per pytest process: module-global because pytest hooks, not fixtures,
# start it (collection must not import a test module before Django is set up).
_cluster: PostgresCluster | None = None


def pytest_configure(config: pytest.Config) -> None:
    if not gevent.monkey.is_module_patched("socket"):
        raise pytest.UsageError(
            "run the suite under the gevent monkey launcher: "
            "python -m gevent.monkey --module pytest (or: make test)"
        )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings.psycopg3")
    # gevent reaps children through its SIGCHLD handler, installed with the first
    # child watcher -- which os.fork() (gevent's) creates in the parent only after the
    # fork. A child that exits before that (a busy machine runs the child first) is
    # never reaped, and gevent's os.waitpid() then waits forever: seen with the fork
    # tests, whenever one was the first to start a child in the process. Install the
    # handler before any test forks.
    install_sigchld = getattr(gevent.get_hub().loop, "install_sigchld", None)
    if install_sigchld is not None:
        install_sigchld()


def pytest_collectstart(collector: pytest.Collector) -> None:
    # Called before a module is imported, and only for the modules selected.
    if isinstance(collector, pytest.Module) and UNIT_DIR not in collector.path.parents:
        start_server()


def start_server() -> PostgresCluster:
    """Start the session's PostgreSQL and set Django up on it (once per process)."""
    global _cluster
    if _cluster is not None:
        return _cluster
    if os.environ.get(NO_SERVER_ENV):
        raise RuntimeError(f"{NO_SERVER_ENV} is set but a test needs the PostgreSQL server")
    try:
        cluster = PostgresCluster()
    except ServerBinariesMissing as exc:
        raise pytest.UsageError(str(exc)) from None
    _cluster = cluster
    cluster.start()
    cluster.psql(f"CREATE DATABASE {TEST_DB}")
    os.environ.update(
        GEVENTPOOL_TEST_DBNAME=TEST_DB,
        GEVENTPOOL_TEST_HOST=cluster.socket_dir,
        GEVENTPOOL_TEST_PORT=str(cluster.port),
        GEVENTPOOL_TEST_USER=cluster.superuser,
        GEVENTPOOL_TEST_PASSWORD=cluster.password,
    )
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", run_syncdb=True, verbosity=0)
    from django.db import connections

    connections.close_all()
    return cluster


def pytest_unconfigure(config: pytest.Config) -> None:
    if _cluster is not None:
        from django_db_geventpool import registry

        registry.close_all()
        _cluster.destroy()


# No test of this suite may be skipped (a missing tool fails instead): count them.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _skipped:
        terminalreporter.write_line(
            f"{len(_skipped)} skipped test(s) fail the run (the suite allows none): "
            + ", ".join(_skipped),
            red=True,
        )


@pytest.fixture(scope="session")
def cluster() -> PostgresCluster:
    return start_server()


@pytest.fixture(autouse=True)
def fresh_pool(cluster):
    """Every test starts with a new pool and the default options, and ends clean."""
    from django.db import connections

    from django_db_geventpool import registry

    settings_dict = connections.settings["default"]
    saved = {**settings_dict, "OPTIONS": dict(settings_dict["OPTIONS"])}
    connections["default"].close()
    connections["default"].close_pool()
    yield
    try:
        connections["default"].close()
    finally:
        registry.close_all()
        settings_dict.clear()
        settings_dict.update(saved)
        _wait_until_the_pools_backends_ended()


def _wait_until_the_pools_backends_ended(timeout: float = 10.0) -> None:
    """Let the server finish ending the backends of the connections just closed.

    A backend ends after its client closed the connection, on its own time: on a
    loaded machine it can still be listed in pg_stat_activity when the next test
    counts the pool's backends. Best effort, bounded: a test that left a connection
    in use (and so a backend) has its own assertions; the next test runs anyway.
    """
    import gevent

    from tests.support.helpers import pool_pids, raw_connect

    try:
        observer = raw_connect()
    except Exception:  # the server is down: nothing is listed anyway
        return
    try:
        deadline = time.monotonic() + timeout
        while pool_pids(observer) and time.monotonic() < deadline:
            gevent.sleep(0.01)
    except Exception:
        pass
    finally:
        observer.close()


@pytest.fixture
def configure_pool():
    """Set pool OPTIONS for this test: ``configure_pool(MAX_CONNS=2, POOL_TIMEOUT=1)``."""
    from django.db import connections

    def configure(**options):
        connections["default"].close()
        connections["default"].close_pool()
        connections.settings["default"]["OPTIONS"].update(options)
        return connections["default"]

    return configure
