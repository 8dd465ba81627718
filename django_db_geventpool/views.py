"""A JSON view of the pool's stats, for every alias served by django_db_geventpool.

It has no permission check of its own: mount it behind yours, for example::

    from django.contrib.admin.views.decorators import staff_member_required
    from django_db_geventpool.views import stats_view

    urlpatterns = [path("internal/db-pool", staff_member_required(stats_view))]

The answer describes the pool of the process that served the request (one
gunicorn worker, one celery worker); ``pid`` tells which::

    {"pid": 4242, "databases": {"default": {"pool_max": 5, "pool_size": 3, ...}}}

Looking at the stats opens no database connection.

`ready_view` answers readiness probes (load balancer, Kubernetes): 200 when every
pooled alias can serve, 503 with the reasons when one cannot (see readiness.py)::

    {"ready": false, "databases": {"default": "pool exhausted: no connection free within 1.0s"}}

`make_ready_view` builds one for chosen aliases or another deadline.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe

from . import get_stats, readiness
from .backends.base import pooled_aliases

__all__ = ["make_ready_view", "pooled_aliases", "ready_view", "stats_view"]


@require_safe
def stats_view(request: HttpRequest) -> JsonResponse:
    """``get_stats()`` of every pooled alias of this process, as JSON (GET/HEAD only)."""
    databases = {alias: get_stats(alias) for alias in pooled_aliases()}
    response = JsonResponse({"pid": os.getpid(), "databases": databases})
    response["Cache-Control"] = "no-store"
    return response


def make_ready_view(
    aliases: Iterable[str] | None = None, timeout: float = readiness.DEFAULT_TIMEOUT
) -> Callable[[HttpRequest], JsonResponse]:
    """A readiness view for ``aliases`` (default: every pooled alias), each probe
    bounded by ``timeout`` seconds (checks run one after the other)."""
    chosen = None if aliases is None else list(aliases)

    @require_safe
    def ready_view(request: HttpRequest) -> JsonResponse:
        databases = {}
        for alias in pooled_aliases() if chosen is None else chosen:
            reason = readiness.check(alias, timeout)
            databases[alias] = "ok" if reason is None else reason
        ready = all(answer == "ok" for answer in databases.values())
        response = JsonResponse(
            {"ready": ready, "databases": databases}, status=200 if ready else 503
        )
        response["Cache-Control"] = "no-store"
        return response

    return ready_view


#: 200 when every pooled alias can serve within a second, else 503 with the reasons.
ready_view = make_ready_view()
