"""Gunicorn with gevent workers, for a Django project on django_db_geventpool.

Use it as is::

    gunicorn -c gunicorn.conf.py project.wsgi

Environment (all optional):

* ``GUNICORN_BIND`` (else ``PORT`` on all interfaces, else ``127.0.0.1:8000``)
* ``WEB_CONCURRENCY``: worker processes (default: one per CPU core). Each worker
  has its own pool: the server sees up to workers x ``MAX_CONNS`` connections per alias.
* ``GUNICORN_WORKER_CONNECTIONS``: concurrent requests per worker (default 1000).
  Requests beyond ``MAX_CONNS`` queue in the pool, for at most ``POOL_TIMEOUT``.
* ``GUNICORN_TIMEOUT``: seconds before a silent worker is restarted (default 30).
* ``GEVENTPOOL_CONTROL_DIR``: a directory shared with ``manage.py geventpool``; every
  worker registers there and answers ``drain``/``resize``/``stats`` on ``SIGUSR2``
  (see django_db_geventpool/control.py). Unset: no handler, no registration.
* ``PROMETHEUS_MULTIPROC_DIR``: prometheus-client's multiprocess mode; every worker
  exports its pools' metrics there (every ``GEVENTPOOL_METRICS_INTERVAL`` seconds,
  default 5, for the gauges), a dead worker's gauges are removed, and any worker's
  ``django_db_geventpool.prometheus.metrics_view`` answers for all of them.

Why the patching happens here: gunicorn imports this file first, before the
application and before the gevent worker's own ``patch_all()`` at worker start.
Anything imported earlier (the app with ``--preload``, Django via a hook) would
otherwise hold unpatched ``socket``/``select``/``threading``, and psycopg 3 picks
its blocking C wait function at import time. Patching at the top of this file
makes every process that serves requests (the master with ``--preload``, every
worker) cooperative for both drivers.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

try:
    # psycopg2: queries must wait through gevent, not in libpq. Installing the
    # callback here (the pool would do it on first use) covers code that uses
    # psycopg2 before any pool exists. Absent with psycopg 3 only: nothing to do.
    from psycogreen.gevent import patch_psycopg
except ImportError:
    pass
else:
    patch_psycopg()


def _default_bind() -> str:
    if os.environ.get("GUNICORN_BIND"):
        return os.environ["GUNICORN_BIND"]
    if os.environ.get("PORT"):
        return f"0.0.0.0:{os.environ['PORT']}"
    return "127.0.0.1:8000"


bind = _default_bind()
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1)
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = 5


def post_worker_init(worker):
    """In each worker, once the app (and Django) is loaded: warm-up, operations, metrics.

    Warm-up: with ``OPTIONS["MIN_CONNS"]`` set, a pool opens that many connections in
    the background as soon as it exists (spread over half a second, never on a
    request's path). Pools are created lazily by the first request; creating them
    here, before the worker accepts requests, has every worker warm when its first
    request arrives. (``post_fork`` would do as well with ``--preload``, where Django
    is already set up in the master; without it Django is loaded only after
    ``post_fork``, hence this later hook.) ``GEVENTPOOL_WARM_UP=0`` turns it off.

    Operations and metrics: runs after gunicorn installed its own signal handlers (it
    resets ``SIGUSR2`` to the default in workers and does not use it there).
    """
    # None of these may keep a worker from serving: a failure is logged, loudly.
    if os.environ.get("GEVENTPOOL_CONTROL_DIR"):
        try:
            from django_db_geventpool import control

            control.serve(os.environ["GEVENTPOOL_CONTROL_DIR"])
        except Exception:
            worker.log.exception("django_db_geventpool: the control handler could not start")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        try:
            from django_db_geventpool import prometheus

            prometheus.start_multiprocess_export(
                float(os.environ.get("GEVENTPOOL_METRICS_INTERVAL", "5"))
            )
        except Exception:
            worker.log.exception("django_db_geventpool: the Prometheus export could not start")

    if os.environ.get("GEVENTPOOL_WARM_UP", "1") == "0" or "django" not in sys.modules:
        return
    try:
        from django.db import connections

        from django_db_geventpool.backends.base import pooled_aliases

        for alias in pooled_aliases():
            connections[alias].geventpool  # noqa: B018 - creating it starts the warm-up
    except Exception:  # a warm-up must never keep a worker from serving
        worker.log.exception("django_db_geventpool: warming up the pools failed")


def child_exit(server, worker):
    """In the master, when a worker has exited: drop its live gauges (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid)
        except Exception:
            server.log.exception(
                "django_db_geventpool: dropping worker %s's gauges failed", worker.pid
            )


def worker_exit(server, worker):
    """In the worker, as it exits: close every pool, so the server sees clean goodbyes.

    In-flight requests have finished by now (graceful shutdown); idle connections
    get a proper Terminate message instead of a dropped socket.
    """
    control = sys.modules.get("django_db_geventpool.control")
    if control is not None:
        control.unregister()
    registry = sys.modules.get("django_db_geventpool.registry")
    if registry is None:
        return  # the app never used the pool in this worker
    registry.close_all()  # logs (and goes past) a pool that fails to close
