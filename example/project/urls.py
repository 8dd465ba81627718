"""Two URLs: a view that queries the database, and the pool's stats."""

from functools import wraps

from django.http import HttpResponseForbidden
from django.urls import path

from django_db_geventpool.views import stats_view
from shop.views import product_summary, summary_with_wait


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
]
