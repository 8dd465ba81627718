"""Settings that cannot work behind a transaction-pooling proxy, checked when declared.

A proxy in transaction mode (pgbouncer ``pool_mode = transaction``, pgcat,
odyssey, Supavisor, RDS Proxy) gives each *transaction* whichever server
connection is free: nothing a session sets outside a transaction survives to the
next one. The pool cannot see the proxy (the server version and ``SHOW`` answers
come from PostgreSQL), so the user declares it with
``OPTIONS["TRANSACTION_POOLING"] = True``, and then:

* refused (`ImproperlyConfigured`), because they break correctness:
  server-side cursors (Django's ``.iterator()`` declares ``WITH HOLD`` cursors
  outside a transaction and fetches from them in later ones: set
  ``DISABLE_SERVER_SIDE_CURSORS = True``), and ``OPTIONS["assume_role"]`` (a
  session ``SET ROLE``: later transactions would run as the login role);
* warned about, because they may work or merely cost a round trip:
  ``OPTIONS["prepare_threshold"]`` with psycopg 3 (named prepared statements need
  pgbouncer >= 1.21 with ``max_prepared_statements`` > 0 and psycopg >= 3.2) and
  ``RESET_QUERY`` (it resets whichever server connection the proxy picks, not the
  one the next user gets; leave resets to the proxy).

Django's session time zone keeps working: pgbouncer tracks ``TimeZone`` (with
``client_encoding``, ``DateStyle``, ``standard_conforming_strings`` and
``application_name``) and sets it on every server connection it assigns.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import ImproperlyConfigured

__all__ = ["check_transaction_pooling"]

logger = logging.getLogger(__name__)


def check_transaction_pooling(alias: str, settings_dict: dict[str, Any]) -> None:
    """Refuse or warn about ``settings_dict`` entries that transaction pooling defeats."""
    options = settings_dict.get("OPTIONS") or {}
    where = f"DATABASES[{alias!r}]"
    if not settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
        raise ImproperlyConfigured(
            f"{where} declares OPTIONS['TRANSACTION_POOLING'], but server-side cursors are "
            "enabled: QuerySet.iterator() would declare a cursor in one transaction and fetch "
            "from it in another, on another server connection. Set "
            f"{where}['DISABLE_SERVER_SIDE_CURSORS'] = True."
        )
    if options.get("assume_role"):
        raise ImproperlyConfigured(
            f"{where}['OPTIONS']['assume_role'] cannot work with TRANSACTION_POOLING: SET ROLE "
            "is session state, and the next transaction may run on another server connection "
            "as the login role. Log in as the role instead (USER), or use session pooling."
        )
    if options.get("prepare_threshold") is not None:
        logger.warning(
            "%s: OPTIONS['prepare_threshold'] with TRANSACTION_POOLING prepares named statements "
            "on one server connection and runs them on another; this only works with pgbouncer "
            ">= 1.21 and max_prepared_statements > 0 (and psycopg >= 3.2). Otherwise remove it "
            "(Django then disables prepared statements).",
            where,
        )
    if options.get("RESET_QUERY"):
        logger.warning(
            "%s: OPTIONS['RESET_QUERY'] with TRANSACTION_POOLING costs a round trip per return "
            "and resets whichever server connection the proxy picks, not the next user's; "
            "remove it, and keep session state out of the application (SET LOCAL inside a "
            "transaction instead of SET).",
            where,
        )
