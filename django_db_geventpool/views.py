"""A JSON view of the pool's stats, for every alias served by django_db_geventpool.

It has no permission check of its own: mount it behind yours, for example::

    from django.contrib.admin.views.decorators import staff_member_required
    from django_db_geventpool.views import stats_view

    urlpatterns = [path("internal/db-pool", staff_member_required(stats_view))]

The answer describes the pool of the process that served the request (one
gunicorn worker, one celery worker); ``pid`` tells which::

    {"pid": 4242, "databases": {"default": {"pool_max": 5, "pool_size": 3, ...}}}

Looking at the stats opens no database connection.
"""

from __future__ import annotations

import os

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe

from . import get_stats
from .backends.base import pooled_aliases

__all__ = ["pooled_aliases", "stats_view"]


@require_safe
def stats_view(request: HttpRequest) -> JsonResponse:
    """``get_stats()`` of every pooled alias of this process, as JSON (GET/HEAD only)."""
    databases = {alias: get_stats(alias) for alias in pooled_aliases()}
    response = JsonResponse({"pid": os.getpid(), "databases": databases})
    response["Cache-Control"] = "no-store"
    return response
