"""MAX_CONNS is a hard cap, even when a burst of greenlets connects at once."""

from __future__ import annotations

import logging
from unittest import mock

import gevent
from django.db import connection
from django.db.backends.postgresql.base import DatabaseWrapper as DjangoPostgreSQLWrapper

from django_db_geventpool import get_stats
from tests.support.helpers import ServerConnectionSampler

logger = logging.getLogger(__name__)

_real_get_new_connection = DjangoPostgreSQLWrapper.get_new_connection


def _slow_get_new_connection(self, conn_params):
    # Yield before the real connect, as a slow network or TLS handshake would:
    # every greenlet that passed a size check would now be connecting at once.
    gevent.sleep(0.05)
    return _real_get_new_connection(self, conn_params)


def test_burst_of_200_greenlets_never_exceeds_max_conns(configure_pool):
    configure_pool(MAX_CONNS=10, POOL_TIMEOUT=30)
    backend_pids: set[int] = set()

    def request() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid(), pg_sleep(0.005)")
                backend_pids.add(cursor.fetchone()[0])
        finally:
            connection.close()

    with mock.patch.object(DjangoPostgreSQLWrapper, "get_new_connection", _slow_get_new_connection):
        with ServerConnectionSampler(interval=0.002) as sampler:
            greenlets = [gevent.spawn(request) for _ in range(200)]
            gevent.joinall(greenlets)

    failures = [g.exception for g in greenlets if not g.successful()]
    logger.info(
        "cap test: peak %d pool connections in pg_stat_activity over %d samples; %d backends used",
        sampler.peak,
        len(sampler.samples),
        len(backend_pids),
    )
    assert failures == []
    assert len(sampler.samples) > 10  # the sampler really watched the burst
    assert 1 <= sampler.peak <= 10
    assert len(backend_pids) <= 10
    stats = get_stats()
    assert stats["pool_size"] <= 10
    assert stats["connections_num"] <= 10
    assert stats["requests_num"] == 200
    assert stats["requests_errors"] == 0
