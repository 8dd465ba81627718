"""Django system checks (``manage.py check``) for the mistakes users of the pool make.

Registered by `register`, which the ENGINE modules call when Django imports them (it
does so during ``django.setup()`` as soon as one model exists: it asks the default
connection for its name length limits), and which the app config calls too
(``"django_db_geventpool"`` in ``INSTALLED_APPS``, for a project whose default alias
uses another ENGINE). Registering twice is harmless. This module imports the backends,
never the reverse: the module graph goes one way (ENGINE module -> checks -> glue).

===============================  ======================================================
``django_db_geventpool.E001``    a pool option has a wrong name, type or range
``django_db_geventpool.E002``    ``OPTIONS["pool"]`` is set (Django's pool; one per alias)
``django_db_geventpool.E003``    psycopg2 with no gevent wait callback and no psycogreen
``django_db_geventpool.E004``    psycopg 3 imported before gevent patched ``select``
``django_db_geventpool.W001``    ``CONN_MAX_AGE`` is not 0 (it has no effect: the pool keeps idle
                                 connections)
``django_db_geventpool.W002``    ``MAX_CONNS`` x processes is above the server's ``max_connections``
``django_db_geventpool.W003``    ``POOL_MODE="transaction"`` with ``ATOMIC_REQUESTS`` (no release)
``django_db_geventpool.W004``    ``POOL_MODE="transaction"`` with ``RESET_QUERY`` (one per use)
``django_db_geventpool.W005``    ``TRANSACTION_POOLING`` with ``OPTIONS["prepare_threshold"]``
                                 (works only with pgbouncer >= 1.21 and prepared statements on)
``django_db_geventpool.W006``    ``TRANSACTION_POOLING`` with ``RESET_QUERY`` (resets whichever
                                 server connection the proxy picks)
===============================  ======================================================

W002 needs the server: it runs when checks are given databases (``check --database
default``, ``migrate``), like Django's own database checks. The number of processes
comes from the setting ``GEVENTPOOL_EXPECTED_PROCESSES``, else from gunicorn's
``WEB_CONCURRENCY`` environment variable, else 1.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError

from .backends.base import pooled_aliases
from .backends.drivers import Psycopg3Ops
from .backends.options import parse_pool_settings

__all__ = [
    "TAG",
    "check_pool_settings",
    "check_connection_budget",
    "expected_processes",
    "register",
]

logger = logging.getLogger(__name__)

TAG = "geventpool"
_ID = "django_db_geventpool.{}"


def _uses_psycopg3() -> bool:
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return is_psycopg3


def _psycopg2_wait_callback_set() -> bool:
    import psycopg2.extensions

    return psycopg2.extensions.get_wait_callback() is not None


def _psycogreen_installed() -> bool:
    return importlib.util.find_spec("psycogreen") is not None


def register() -> None:
    """Register the system checks with Django (idempotent)."""
    checks.register(check_pool_settings, TAG)
    checks.register(check_connection_budget, checks.Tags.database, TAG)


def check_pool_settings(
    app_configs: Iterable[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Options, driver patching and ``CONN_MAX_AGE`` of every pooled alias (no I/O)."""
    from django.db import connections

    messages: list[checks.CheckMessage] = []
    aliases = pooled_aliases()
    for alias in aliases:
        settings_dict = connections.settings[alias]
        where = f"DATABASES[{alias!r}]"
        if "pool" in (settings_dict.get("OPTIONS") or {}):
            messages.append(
                checks.Error(
                    f"{where}['OPTIONS']['pool'] is set, but django_db_geventpool is already the "
                    "pool for this alias.",
                    hint="Remove 'pool'; size the pool with OPTIONS['MAX_CONNS'].",
                    id=_ID.format("E002"),
                )
            )
        else:
            try:
                parse_pool_settings(alias, settings_dict)
            except ImproperlyConfigured as exc:
                messages.append(checks.Error(str(exc), id=_ID.format("E001")))
        max_age = settings_dict.get("CONN_MAX_AGE", 0)
        if max_age != 0:
            messages.append(
                checks.Warning(
                    f"{where}['CONN_MAX_AGE'] is {max_age!r}; with django_db_geventpool it has no "
                    "effect: every connection goes back to the pool when Django closes it, and the "
                    "pool keeps idle connections itself.",
                    hint="Set CONN_MAX_AGE to 0, and tune OPTIONS['MAX_IDLE'] / ['MAX_LIFETIME'] "
                    "instead.",
                    id=_ID.format("W001"),
                )
            )
        messages.extend(_combination_warnings(alias, settings_dict))
    if not aliases:
        return messages
    if _uses_psycopg3():
        try:
            Psycopg3Ops.ensure_cooperative(aliases[0])
        except ImproperlyConfigured as exc:
            messages.append(
                checks.Error(
                    str(exc),
                    hint="gevent.monkey.patch_all() must run before anything imports psycopg.",
                    id=_ID.format("E004"),
                )
            )
    elif not _psycopg2_wait_callback_set() and not _psycogreen_installed():
        messages.append(
            checks.Error(
                f"DATABASES[{aliases[0]!r}] uses psycopg2, which has no gevent wait callback, and "
                "psycogreen is not installed: every query would block all greenlets of the "
                "process.",
                hint="pip install 'django-db-geventpool[psycopg2]' (it brings psycogreen); "
                "the pool "
                "installs its callback, and gunicorn.conf.py does it at start-up.",
                id=_ID.format("E003"),
            )
        )
    return messages


# Settings that defeat a mode the alias declares (the mode still works with them):
# id -> (message, hint); the message is formatted with ``where`` (the alias's entry).
_COMBINATIONS: dict[str, tuple[str, str]] = {
    "W003": (
        "{where} has POOL_MODE='transaction' and ATOMIC_REQUESTS=True: every view runs in one "
        "transaction, so each request holds its connection from its first query to its end, as "
        "in session mode, including while it waits on anything else.",
        "Drop ATOMIC_REQUESTS and wrap only the writes that belong together in "
        "transaction.atomic(), or use POOL_MODE='session'.",
    ),
    "W004": (
        "{where} has POOL_MODE='transaction' and OPTIONS['RESET_QUERY']: the reset runs every "
        "time the connection is given back, that is after every statement outside a "
        "transaction (one more round trip each), and with DISCARD ALL the session set-up (time "
        "zone, role) is redone at every checkout.",
        "Remove RESET_QUERY and keep session state out of the application: SET LOCAL inside "
        "transaction.atomic(), settings in OPTIONS, pg_advisory_xact_lock().",
    ),
    "W005": (
        "{where} has OPTIONS['prepare_threshold'] with TRANSACTION_POOLING: named statements are "
        "prepared on one server connection and run on another; this only works with pgbouncer "
        ">= 1.21 and max_prepared_statements > 0 (and psycopg >= 3.2).",
        "Remove prepare_threshold (Django then disables prepared statements), or configure "
        "pgbouncer's max_prepared_statements.",
    ),
    "W006": (
        "{where} has OPTIONS['RESET_QUERY'] with TRANSACTION_POOLING: it costs a round trip per "
        "return and resets whichever server connection the proxy picks, not the next user's.",
        "Remove RESET_QUERY and keep session state out of the application (SET LOCAL inside a "
        "transaction instead of SET).",
    ),
}


def _combination_warnings(alias: str, settings_dict: dict[str, Any]) -> list[checks.CheckMessage]:
    """Settings that defeat ``POOL_MODE = "transaction"`` or a declared transaction pooler.

    (The settings that cannot work behind a pooler are refused by the option parsing, E001.)
    """
    options = settings_dict.get("OPTIONS") or {}
    transaction_mode = options.get("POOL_MODE") == "transaction"
    pooler = options.get("TRANSACTION_POOLING") is True
    found = (
        ("W003", transaction_mode and settings_dict.get("ATOMIC_REQUESTS")),
        ("W004", transaction_mode and options.get("RESET_QUERY")),
        ("W005", pooler and options.get("prepare_threshold") is not None),
        ("W006", pooler and options.get("RESET_QUERY")),
    )
    where = f"DATABASES[{alias!r}]"
    return [
        checks.Warning(
            _COMBINATIONS[code][0].format(where=where),
            hint=_COMBINATIONS[code][1],
            id=_ID.format(code),
        )
        for code, applies in found
        if applies
    ]


def expected_processes() -> int:
    """How many processes will each hold a pool: setting, else ``WEB_CONCURRENCY``, else 1."""
    from django.conf import settings

    value = getattr(settings, "GEVENTPOOL_EXPECTED_PROCESSES", None)
    if value is None:
        value = os.environ.get("WEB_CONCURRENCY") or 1
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


def _server_limit(alias: str) -> int:
    """Connections the server allows to non-superusers; one round trip, connection given back."""
    from django.db import connections

    wrapper = connections[alias]
    try:
        with wrapper.cursor() as cursor:
            cursor.execute(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int"
            )
            return cursor.fetchone()[0]
    finally:
        wrapper.close()


def check_connection_budget(
    app_configs: Iterable[Any] | None = None, databases: Iterable[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """``MAX_CONNS`` x processes, summed per server, against the server's ``max_connections``."""
    from django.db import connections

    if not databases:
        return []
    asked = set(databases)
    processes = expected_processes()
    # Aliases on the same server share its max_connections.
    by_server: dict[tuple, list[tuple[str, int]]] = defaultdict(list)
    for alias in pooled_aliases():
        settings_dict = connections.settings[alias]
        try:
            max_conns = parse_pool_settings(alias, settings_dict).max_conns
        except ImproperlyConfigured:
            continue  # reported by check_pool_settings
        server = (settings_dict.get("HOST") or "", str(settings_dict.get("PORT") or ""))
        by_server[server].append((alias, max_conns))
    messages: list[checks.CheckMessage] = []
    for (host, port), members in by_server.items():
        probe = next((alias for alias, _ in members if alias in asked), None)
        if probe is None:
            continue
        try:
            limit = _server_limit(probe)
        except (ImproperlyConfigured, DatabaseError) as exc:
            # Unreachable or misconfigured: other checks (and Django's) say so.
            logger.debug("connection budget of %r not checked: %s", probe, exc)
            continue
        per_process = sum(max_conns for _, max_conns in members)
        total = per_process * processes
        if total > limit:
            detail = " + ".join(f"{alias!r}: {max_conns}" for alias, max_conns in members)
            messages.append(
                checks.Warning(
                    f"The pools may open {total} connections to "
                    f"{host or 'localhost'}:{port or 5432} "
                    f"(MAX_CONNS {detail} = {per_process} per process x {processes} processes), "
                    f"but the server accepts {limit} "
                    "(max_connections minus superuser_reserved_connections).",
                    hint="Lower MAX_CONNS, run fewer processes, raise max_connections, "
                    "or put PgBouncer "
                    "in front. The process count comes from GEVENTPOOL_EXPECTED_PROCESSES or "
                    "WEB_CONCURRENCY.",
                    id=_ID.format("W002"),
                )
            )
    return messages
