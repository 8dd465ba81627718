"""The stats view and the periodic stats log line (OPTIONS["STATS_LOG_INTERVAL"])."""

from __future__ import annotations

import json
import logging
import os
import time

import gevent
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import RequestFactory

from django_db_geventpool.pool import STATS_KEYS
from django_db_geventpool.views import pooled_aliases, stats_view
from tests.testapp.models import Item


def _stats_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "django_db_geventpool.statslog"]


def _wait_for_lines(caplog, count: int, deadline_seconds: float = 30.0) -> list[str]:
    deadline = time.monotonic() + deadline_seconds
    while len(_stats_lines(caplog)) < count and time.monotonic() < deadline:
        gevent.sleep(0.01)
    return _stats_lines(caplog)


def test_stats_view_reports_every_pooled_alias_as_json():
    Item.objects.count()
    connection.close()
    response = stats_view(RequestFactory().get("/pool/stats"))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    body = json.loads(response.content)
    assert body["pid"] == os.getpid()
    assert list(body["databases"]) == pooled_aliases() == ["default"]
    stats = body["databases"]["default"]
    assert set(STATS_KEYS) <= set(stats)
    assert stats["pool_max"] == 4
    assert stats["pool_size"] == stats["pool_available"] == 1
    assert stats["requests_num"] == 1


def test_stats_view_opens_no_connection_and_refuses_writes():
    response = stats_view(RequestFactory().get("/pool/stats"))
    assert json.loads(response.content)["databases"]["default"]["connections_num"] == 0
    for method in ("post", "put", "patch", "delete"):
        request = getattr(RequestFactory(), method)("/pool/stats")
        assert stats_view(request).status_code == 405, method


def test_stats_view_answers_head():
    """GET and HEAD are documented (docs/observability.md): a HEAD probe gets a 200."""
    response = stats_view(RequestFactory().head("/pool/stats"))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"


def test_stats_view_can_be_wrapped_by_a_permission_check():
    from django.contrib.auth.decorators import permission_required
    from django.core.exceptions import PermissionDenied

    class Visitor:
        def __init__(self, allowed: bool) -> None:
            self.allowed = allowed

        def has_perms(self, perms) -> bool:
            return self.allowed

    guarded = permission_required("ops.view_pool_stats", raise_exception=True)(stats_view)
    request = RequestFactory().get("/pool/stats")
    request.user = Visitor(allowed=False)
    with pytest.raises(PermissionDenied):
        guarded(request)
    request.user = Visitor(allowed=True)
    assert guarded(request).status_code == 200


def test_stats_log_line_every_interval_until_the_pool_closes(configure_pool, caplog):
    caplog.set_level(logging.INFO, logger="django_db_geventpool.statslog")
    configure_pool(STATS_LOG_INTERVAL=0.05)
    Item.objects.count()
    connection.close()
    # Lines logged so far may predate the close (a slow connect spans intervals):
    # the one checked is logged after it.
    wanted = max(2, len(_stats_lines(caplog)) + 1)
    lines = _wait_for_lines(caplog, wanted)
    assert len(lines) >= wanted
    line = lines[-1]
    assert line.startswith(f"pool 'default' pid={os.getpid()} ")
    pairs = dict(item.split("=", 1) for item in line.split()[3:])
    assert set(STATS_KEYS) <= set(pairs)
    assert pairs["pool_max"] == "4"
    assert pairs["pool_available"] == "1"
    assert pairs["requests_num"] == "1"

    connection.close_pool()
    seen = len(_stats_lines(caplog))
    gevent.sleep(0.2)
    assert len(_stats_lines(caplog)) == seen


def test_no_stats_log_line_by_default(configure_pool, caplog):
    caplog.set_level(logging.INFO, logger="django_db_geventpool.statslog")
    configure_pool()
    Item.objects.count()
    connection.close()
    gevent.sleep(0.2)
    assert _stats_lines(caplog) == []


@pytest.mark.parametrize("value", [0, -1, "5", True])
def test_bad_stats_log_interval_is_refused_by_name(configure_pool, value):
    configure_pool(STATS_LOG_INTERVAL=value)
    with pytest.raises(ImproperlyConfigured, match="STATS_LOG_INTERVAL"):
        Item.objects.count()
