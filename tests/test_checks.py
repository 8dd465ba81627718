"""System checks: registered by the backend, run by ``manage.py check``."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys

import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connections
from django.test import override_settings

from django_db_geventpool import checks as pool_checks
from tests.support.servers import EXAMPLE_DIR, REPO_ROOT


def _ids(**kwargs) -> list[str]:
    return sorted(m.id for m in checks.run_checks(tags=[pool_checks.TAG], **kwargs))


def test_a_good_configuration_passes_manage_py_check():
    out = io.StringIO()
    call_command("check", stdout=out)
    assert "no issues" in out.getvalue()
    assert _ids() == []


def test_manage_py_check_runs_them_without_an_installed_app(tmp_path):
    """The example project does not list django_db_geventpool in INSTALLED_APPS."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "MAX_CONNS": "0",
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=EXAMPLE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert result.returncode == 1
    assert "django_db_geventpool.E001" in result.stdout
    assert "['MAX_CONNS'] must be an integer >= 1; got 0" in result.stdout


def test_bad_option_fails_manage_py_check(configure_pool):
    configure_pool(MAX_CONS=10)
    with pytest.raises(SystemCheckError, match=r"MAX_CONS.*did you mean 'MAX_CONNS'"):
        call_command("check", stdout=io.StringIO())
    assert _ids() == ["django_db_geventpool.E001"]


def test_django_pool_option_is_an_error(configure_pool):
    configure_pool(pool=True)
    assert _ids() == ["django_db_geventpool.E002"]


@pytest.mark.parametrize("max_age", [60, None])
def test_conn_max_age_is_a_warning(max_age):
    connections.settings["default"]["CONN_MAX_AGE"] = max_age
    messages = checks.run_checks(tags=[pool_checks.TAG])
    assert [m.id for m in messages] == ["django_db_geventpool.W001"]
    assert "CONN_MAX_AGE" in messages[0].msg and "MAX_IDLE" in messages[0].hint


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"ATOMIC_REQUESTS": True}, "django_db_geventpool.W003"),
        ({"OPTIONS": {"RESET_QUERY": "DISCARD ALL"}}, "django_db_geventpool.W004"),
    ],
)
def test_settings_that_defeat_transaction_mode_are_warnings(setting, expected):
    settings_dict = connections.settings["default"]
    options = {**settings_dict["OPTIONS"], **setting.pop("OPTIONS", {})}
    settings_dict.update(setting, OPTIONS=options)
    assert _ids() == []  # session mode: nothing to say
    options["POOL_MODE"] = "transaction"
    assert _ids() == [expected]


@pytest.mark.parametrize(
    "option, expected",
    [
        ({"prepare_threshold": 5}, "django_db_geventpool.W005"),
        ({"RESET_QUERY": "DISCARD ALL"}, "django_db_geventpool.W006"),
    ],
)
def test_settings_that_may_not_work_behind_transaction_pooling_are_warnings(option, expected):
    settings_dict = connections.settings["default"]
    settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
    settings_dict["OPTIONS"].update(option)
    assert _ids() == []  # no proxy declared: nothing to say
    settings_dict["OPTIONS"]["TRANSACTION_POOLING"] = True
    assert _ids() == [expected]


# Each environment has one driver: only its own import-order check is collected.
_PSYCOPG3 = pool_checks._uses_psycopg3()


def _psycopg3_imported_before_patching_is_an_error(monkeypatch):
    import psycopg.waiting as waiting

    # What psycopg picks when it is imported before gevent patched select.
    monkeypatch.setattr(waiting, "wait", waiting.wait_c)
    messages = checks.run_checks(tags=[pool_checks.TAG])
    assert [m.id for m in messages] == ["django_db_geventpool.E004"]
    assert "gevent.monkey.patch_all()" in messages[0].msg


def _psycopg2_without_green_patching_is_an_error(monkeypatch):
    import psycopg2.extensions

    # The check reads psycopg2's process-wide wait callback. Clearing the real one
    # for the whole of run_checks() was flaky: a garbage-collected greenlet from an
    # earlier test runs its cleanup on the spot (GreenletExit), and a cleanup that
    # opens a pool installs psycogreen's callback again. So the predicate is proven
    # against the real callback on its own, with the collector off...
    callback = psycopg2.extensions.get_wait_callback()
    assert callback is not None  # psycogreen's, installed when the pool was created
    gc.disable()
    try:
        psycopg2.extensions.set_wait_callback(None)
        without = pool_checks._psycopg2_wait_callback_set()
    finally:
        psycopg2.extensions.set_wait_callback(callback)
        gc.enable()
    assert without is False
    assert pool_checks._psycopg2_wait_callback_set() is True
    # ...and the check is run with that predicate answering "no callback".
    monkeypatch.setattr(pool_checks, "_psycopg2_wait_callback_set", lambda: False)
    monkeypatch.setattr(pool_checks, "_psycogreen_installed", lambda: False)
    messages = checks.run_checks(tags=[pool_checks.TAG])
    assert [m.id for m in messages] == ["django_db_geventpool.E003"]
    assert "psycogreen" in messages[0].msg
    # psycogreen installed: the pool will install its callback, so all is well.
    monkeypatch.setattr(pool_checks, "_psycogreen_installed", lambda: True)
    assert _ids() == []


if _PSYCOPG3:
    test_psycopg3_imported_before_patching_is_an_error = (
        _psycopg3_imported_before_patching_is_an_error
    )
else:
    test_psycopg2_without_green_patching_is_an_error = _psycopg2_without_green_patching_is_an_error


def test_connection_budget_against_the_servers_max_connections(configure_pool, monkeypatch):
    # The test cluster runs with max_connections=200, 3 reserved for superusers.
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    configure_pool(MAX_CONNS=50)
    with override_settings(GEVENTPOOL_EXPECTED_PROCESSES=4):
        assert _ids(databases=["default"]) == ["django_db_geventpool.W002"]
        # Plain `manage.py check` does not ask the server (as with Django's own checks).
        plain = [m.id for m in checks.run_checks() if m.id.startswith("django_db_geventpool")]
        assert plain == []
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    messages = checks.run_checks(tags=[pool_checks.TAG], databases=["default"])
    assert messages == []
    monkeypatch.setenv("WEB_CONCURRENCY", "5")
    messages = checks.run_checks(tags=[pool_checks.TAG], databases=["default"])
    assert [m.id for m in messages] == ["django_db_geventpool.W002"]
    assert "250 connections" in messages[0].msg and "accepts 197" in messages[0].msg


def test_budget_check_gives_its_connection_back(configure_pool):
    from django_db_geventpool import get_stats

    configure_pool(MAX_CONNS=2)
    assert _ids(databases=["default"]) == []
    stats = get_stats()
    assert stats["pool_size"] == stats["pool_available"] == 1
