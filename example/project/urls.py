"""A view that queries the database; the pool's stats, readiness and Prometheus metrics."""

import os
from functools import wraps

from django.http import HttpResponseForbidden
from django.urls import path
from shop.views import product_summary, summary_with_wait

from django_db_geventpool.views import ready_view, stats_view


def loopback_only(view):
    """The permission check in front of the stats view: here, local callers only.

    In a real project use your own check, e.g. ``staff_member_required(stats_view)``.
    """

    @wraps(view)
    def guarded(request, *args, **kwargs):
        if request.META.get("REMOTE_ADDR") not in ("127.0.0.1", "::1"):
            return HttpResponseForbidden("stats are for local callers only")
        return view(request, *args, **kwargs)

    return guarded


urlpatterns = [
    path("products/summary", product_summary),
    path("products/summary-with-wait", summary_with_wait),
    path("pool/stats", loopback_only(stats_view)),
    path("ready", ready_view),
]

try:
    from django_db_geventpool import prometheus
except ImportError:  # prometheus-client is not installed: no /metrics
    pass
else:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # One process: the collector, read at scrape time. In multiprocess mode
        # gunicorn.conf.py starts the export in every worker instead.
        prometheus.register()
    urlpatterns.append(path("metrics", loopback_only(prometheus.metrics_view)))
