"""The hub is never blocked: a wrong import order or a missing wait callback is caught.

Import order is process-wide, so those cases run in a child Python process (the
same interpreter and virtualenv as the suite) against the suite's server. Which
cases apply depends on the driver the environment has: Django loads psycopg 3
whenever it is importable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gevent
from django.db import connection
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from django_db_geventpool import get_stats

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_child(script: str, settings: str) -> tuple[dict, str]:
    """Run ``script`` in a new interpreter; return (its JSON report on stdout, its stderr)."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": settings, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_hub_keeps_running_during_a_server_side_sleep():
    ticks = []

    def ticker() -> None:
        while True:
            ticks.append(1)
            gevent.sleep(0.01)

    ticking = gevent.spawn(ticker)
    gevent.sleep(0)
    try:
        with connection.cursor() as cursor:
            before = len(ticks)
            cursor.execute("SELECT pg_sleep(0.5)")
            during = len(ticks) - before
    finally:
        ticking.kill()
        connection.close()
    # A blocked hub would let the ticker run at most once during the query.
    assert during >= 5
    assert get_stats()["requests_errors"] == 0


if is_psycopg3:

    def test_psycopg_imported_before_patching_is_refused():
        report, _ = run_child(
            """
            import psycopg  # before patching: psycopg picks its blocking C wait
            import gevent.monkey
            gevent.monkey.patch_all()
            import json, sys, django
            django.setup()
            from django.db import connection
            try:
                connection.ensure_connection()
                outcome = {"error": None}
            except Exception as exc:
                outcome = {"error": type(exc).__name__, "message": str(exc)}
            sys.stdout.write(json.dumps(outcome) + "\\n")
            """,
            "tests.settings.psycopg3",
        )
        assert report["error"] == "ImproperlyConfigured"
        assert "DATABASES['default']" in report["message"]
        assert "psycopg was imported before gevent.monkey.patch_all()" in report["message"]
        assert "python -m gevent.monkey" in report["message"]

    def test_psycopg_imported_after_patching_is_accepted():
        report, _ = run_child(
            """
            import gevent.monkey
            gevent.monkey.patch_all()
            import json, sys, django
            django.setup()
            from django.db import connection
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                value = cursor.fetchone()[0]
            sys.stdout.write(json.dumps({"value": value}) + "\\n")
            """,
            "tests.settings.psycopg3",
        )
        assert report == {"value": 1}

    def test_psycopg2_engine_with_psycopg3_installed_says_what_to_do():
        report, _ = run_child(
            """
            import gevent.monkey
            gevent.monkey.patch_all()
            import json, sys, django
            try:
                django.setup()  # loading the backend is enough to fail
                from django.db import connection
                connection.ensure_connection()
                outcome = {"error": None}
            except Exception as exc:
                outcome = {"error": type(exc).__name__, "message": str(exc)}
            sys.stdout.write(json.dumps(outcome) + "\\n")
            """,
            "tests.settings.psycopg2",
        )
        assert report["error"] == "ImproperlyConfigured"
        assert "psycopg 3 is installed" in report["message"]
        assert "django_db_geventpool.backends.postgresql_psycopg3" in report["message"]

else:

    def test_psycopg2_gets_psycogreens_wait_callback():
        report, stderr = run_child(
            """
            import gevent.monkey
            gevent.monkey.patch_all()
            import json, logging, sys
            logging.basicConfig(level=logging.INFO, stream=sys.stderr)
            import django
            django.setup()
            import gevent, psycopg2.extensions
            before = psycopg2.extensions.get_wait_callback()
            from django.db import connection
            ticks = []
            def ticker():
                while True:
                    ticks.append(1)
                    gevent.sleep(0.01)
            ticking = gevent.spawn(ticker)
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                started = len(ticks)
                cursor.execute("SELECT pg_sleep(0.3)")
                during = len(ticks) - started
            ticking.kill()
            after = psycopg2.extensions.get_wait_callback()
            sys.stdout.write(json.dumps({
                "before": repr(before),
                "after": getattr(after, "__module__", None),
                "ticks_during_query": during,
            }) + "\\n")
            """,
            "tests.settings.psycopg2",
        )
        assert report["before"] == "None"
        assert report["after"] == "psycogreen.gevent"
        assert report["ticks_during_query"] >= 5
        assert "installed psycogreen's gevent wait callback for psycopg2" in stderr

    def test_psycopg2_keeps_a_wait_callback_already_installed():
        report, stderr = run_child(
            """
            import gevent.monkey
            gevent.monkey.patch_all()
            import json, logging, sys
            logging.basicConfig(level=logging.INFO, stream=sys.stderr)
            import psycopg2.extensions
            from psycogreen.gevent import gevent_wait_callback
            def own_callback(conn, timeout=None):
                return gevent_wait_callback(conn, timeout)
            psycopg2.extensions.set_wait_callback(own_callback)
            import django
            django.setup()
            from django.db import connection
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            after = psycopg2.extensions.get_wait_callback()
            sys.stdout.write(json.dumps({"kept": after is own_callback}) + "\\n")
            """,
            "tests.settings.psycopg2",
        )
        assert report == {"kept": True}
        assert "installed psycogreen" not in stderr
