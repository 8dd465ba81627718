"""The periodic stats log line (``OPTIONS["STATS_LOG_INTERVAL"]``).

Every interval, one INFO line per pool on the ``django_db_geventpool.statslog``
logger, ``key=value`` pairs that grep and log pipelines can split::

    pool 'default' pid=4242 pool_max=5 pool_size=5 pool_available=0 requests_waiting=12 ...

The logging greenlet holds no strong reference to the pool and ends when the pool
is closed. After ``fork()`` it keeps running in the child too, so each process logs
its own pool.
"""

from __future__ import annotations

import logging
import os
import weakref

import gevent

from .pool import ConnectionPool

__all__ = ["format_stats", "start_stats_logger"]

logger = logging.getLogger(__name__)


def format_stats(pool: ConnectionPool) -> str:
    """One line: the pool's name, this process's pid and every stat as key=value."""
    stats = pool.get_stats()
    pairs = " ".join(f"{key}={stats[key]}" for key in sorted(stats))
    return f"pool {pool.name!r} pid={os.getpid()} {pairs}"


def start_stats_logger(pool: ConnectionPool, interval: float) -> gevent.Greenlet:
    """Log the pool's stats every ``interval`` seconds until the pool is closed."""
    return gevent.spawn(_log_forever, weakref.ref(pool), interval)


def _log_forever(pool_ref: weakref.ref[ConnectionPool], interval: float) -> None:
    while True:
        gevent.sleep(interval)
        pool = pool_ref()
        if pool is None or pool.closed:
            return
        logger.info("%s", format_stats(pool))
        del pool
