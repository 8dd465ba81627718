"""The benchmark's throwaway PostgreSQL: one cluster with a ``bench`` database."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def bench_database(**server_settings: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Start a cluster (``postgresql.conf`` settings as keywords), create ``bench``;
    yield the cluster and the database's settings (loopback TCP); destroy it after."""
    sys.path.insert(0, str(ROOT))
    from tests.support.pgserver import PostgresCluster

    cluster = PostgresCluster(settings=server_settings or None)
    cluster.start()
    try:
        cluster.psql("CREATE DATABASE bench")
        yield cluster, cluster.database_settings("bench", tcp=True)
    finally:
        cluster.destroy()
