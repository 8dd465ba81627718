"""Boots a throwaway PostgreSQL for the whole session, then Django on top of it.

Run the suite under the gevent monkey launcher (``make test`` does):
``python -m gevent.monkey --module pytest``. The settings module comes from
``DJANGO_SETTINGS_MODULE`` (default ``tests.settings.psycopg3``).
"""

from __future__ import annotations

import os

import gevent.monkey
import pytest

from tests.support.pgserver import PostgresCluster, ServerBinariesMissing

TEST_DB = "geventpool_test"
_cluster: PostgresCluster | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _cluster
    if not gevent.monkey.is_module_patched("socket"):
        raise pytest.UsageError(
            "run the suite under the gevent monkey launcher: "
            "python -m gevent.monkey --module pytest (or: make test)"
        )
    try:
        _cluster = PostgresCluster()
    except ServerBinariesMissing as exc:
        raise pytest.UsageError(str(exc)) from None
    _cluster.start()
    _cluster.psql(f"CREATE DATABASE {TEST_DB}")
    os.environ.update(
        GEVENTPOOL_TEST_DBNAME=TEST_DB,
        GEVENTPOOL_TEST_HOST=_cluster.socket_dir,
        GEVENTPOOL_TEST_PORT=str(_cluster.port),
        GEVENTPOOL_TEST_USER=_cluster.superuser,
        GEVENTPOOL_TEST_PASSWORD=_cluster.password,
    )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings.psycopg3")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", run_syncdb=True, verbosity=0)
    from django.db import connections

    connections.close_all()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _cluster is not None:
        from django_db_geventpool import registry

        for pool in list(registry.pools.values()):
            pool.close()
        _cluster.destroy()


@pytest.fixture(scope="session")
def cluster() -> PostgresCluster:
    assert _cluster is not None
    return _cluster


@pytest.fixture(autouse=True)
def fresh_pool():
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
        for pool in list(registry.pools.values()):
            pool.close()
        registry.pools.clear()
        settings_dict.clear()
        settings_dict.update(saved)


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
