"""The pool's options in ``DATABASES[alias]["OPTIONS"]``: defaults, validation.

Validation happens once per alias, when its pool is created; a wrong value raises
`ImproperlyConfigured` naming the alias, the option and what is accepted. The pool
options are removed before the rest of ``OPTIONS`` reaches the driver.

``TRANSACTION_POOLING = True`` declares a proxy in transaction mode (pgbouncer
``pool_mode = transaction``, pgcat, odyssey, Supavisor, RDS Proxy): it gives each
*transaction* whichever server connection is free, so nothing a session sets outside
a transaction survives to the next one. The pool cannot see the proxy (the server
version and ``SHOW`` answers come from PostgreSQL), hence the declaration. Settings
that break correctness behind it are refused here (`_refuse_under_transaction_pooling`):
server-side cursors (Django's ``.iterator()`` declares ``WITH HOLD`` cursors outside a
transaction and fetches from them in later ones) and ``OPTIONS["assume_role"]`` (a
session ``SET ROLE``). Those that may work or merely cost a round trip are system
checks (``checks.py``, W005 and W006). Django's session time zone keeps working:
pgbouncer tracks ``TimeZone`` and sets it on every server connection it assigns.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from .pool_mode import POOL_MODES, TRANSACTION

__all__ = ["PoolSettings", "POOL_OPTION_NAMES", "TOP_LEVEL_OPTION_NAMES", "parse_pool_settings"]

_UNSET = object()

# name -> (default, kind, what the message says is accepted)
_SPEC: dict[str, tuple[Any, str, str]] = {
    "MAX_CONNS": (4, "int>=1", "an integer >= 1"),
    "REUSE_CONNS": (None, "int>=0?", "an integer >= 0 (at most MAX_CONNS), or None for MAX_CONNS"),
    "POOL_TIMEOUT": (30.0, "num>0", "a number of seconds > 0"),
    "HEALTH_CHECK_DELAY": (1.0, "num>=0?", "a number of seconds >= 0, or None (local check only)"),
    "MAX_LIFETIME": (3600.0, "num>0?", "a number of seconds > 0, or None (no limit)"),
    "MAX_IDLE": (600.0, "num>0?", "a number of seconds > 0, or None (no limit)"),
    "LEAK_TIMEOUT": (None, "num>0?", "a number of seconds > 0, or None (no reporting)"),
    "CONNECT_RETRIES": (1, "int>=0", "an integer >= 0"),
    "CONNECT_RETRY_DELAY": (0.1, "num>=0", "a number of seconds >= 0"),
    "RESET_QUERY": (None, "sql?", 'an SQL string such as "DISCARD ALL", or None'),
    "PEERS": (None, "aliases?", "a list of other DATABASES aliases, or None"),
    "CHECK_INTERVAL": (30.0, "num>0", "a number of seconds > 0"),
    "STATS_LOG_INTERVAL": (None, "num>0?", "a number of seconds > 0, or None (no stats log line)"),
    "TRANSACTION_POOLING": (False, "bool", "True (behind pgbouncer in transaction mode) or False"),
    "MIN_CONNS": (0, "int>=0", "an integer >= 0 (at most MAX_CONNS)"),
    "KEEPALIVE_INTERVAL": (None, "num>0?", "a number of seconds > 0, or None (no keepalive)"),
    "POOL_MODE": ("session", "mode", '"session" or "transaction"'),
}
POOL_OPTION_NAMES = tuple(_SPEC)
# As in django-proxysql, these may also stand at the top level of the entry.
TOP_LEVEL_OPTION_NAMES = ("PEERS", "CHECK_INTERVAL")


@dataclass(frozen=True)
class PoolSettings:
    """Validated pool options of one alias."""

    max_conns: int
    reuse_conns: int
    pool_timeout: float
    health_check_delay: float | None
    max_lifetime: float | None
    max_idle: float | None
    leak_timeout: float | None
    connect_retries: int
    connect_retry_delay: float
    reset_query: str | None
    peers: tuple[str, ...]
    check_interval: float
    # Not a ConnectionPool argument: the backend starts a stats logger (statslog.py).
    stats_log_interval: float | None = None
    # Declared proxy in transaction mode (see the module docstring).
    transaction_pooling: bool = False
    min_conns: int = 0
    keepalive_interval: float | None = None
    # "session" or "transaction" (pool_mode.py): when a wrapper gives its connection back.
    pool_mode: str = "session"

    def pool_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `ConnectionPool`."""
        return {
            "max_size": self.max_conns,
            "reuse_size": self.reuse_conns,
            "timeout": self.pool_timeout,
            "health_check_delay": self.health_check_delay,
            "max_lifetime": self.max_lifetime,
            "max_idle": self.max_idle,
            "leak_timeout": self.leak_timeout,
            "connect_retries": self.connect_retries,
            "connect_retry_delay": self.connect_retry_delay,
            "reset_query": self.reset_query,
            "min_size": self.min_conns,
            "keepalive_interval": self.keepalive_interval,
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _accepts(kind: str, value: Any) -> bool:
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind == "int>=1":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if kind == "int>=0":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "num>0":
        return _is_number(value) and value > 0
    if kind == "num>=0":
        return _is_number(value) and value >= 0
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "sql":
        return isinstance(value, str) and value.strip() != ""
    if kind == "mode":
        return value in POOL_MODES
    if kind == "aliases":
        return isinstance(value, (list, tuple)) and all(isinstance(a, str) and a for a in value)
    raise AssertionError(kind)


def parse_pool_settings(alias: str, settings_dict: dict[str, Any]) -> PoolSettings:
    """Validate the pool options of ``settings_dict``; raise `ImproperlyConfigured`."""
    options = settings_dict.get("OPTIONS") or {}
    where = f"DATABASES[{alias!r}]['OPTIONS']"
    if "pool" in options:
        raise ImproperlyConfigured(
            f"{where}['pool'] is set, but django_db_geventpool is already the pool for this "
            "alias. Remove 'pool' and size the pool with OPTIONS['MAX_CONNS'] (one pool per alias)."
        )
    unknown = [k for k in options if isinstance(k, str) and k.isupper() and k not in _SPEC]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], POOL_OPTION_NAMES, n=1)
        raise ImproperlyConfigured(
            f"{where}[{unknown[0]!r}] is not a django_db_geventpool option"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" Known options: {', '.join(POOL_OPTION_NAMES)}."
        )
    values: dict[str, Any] = {}
    for name, (default, kind, accepted) in _SPEC.items():
        value = options.get(name, _UNSET)
        source = f"{where}[{name!r}]"
        if value is _UNSET and name in TOP_LEVEL_OPTION_NAMES:
            value = settings_dict.get(name, _UNSET)
            source = f"DATABASES[{alias!r}][{name!r}]"
        if value is _UNSET:
            value = default
        elif not _accepts(kind, value):
            raise ImproperlyConfigured(f"{source} must be {accepted}; got {value!r}.")
        values[name] = value
    max_conns = values["MAX_CONNS"]
    reuse = values["REUSE_CONNS"]
    if reuse is None:
        reuse = max_conns
    elif reuse > max_conns:
        raise ImproperlyConfigured(
            f"{where}['REUSE_CONNS'] must be at most MAX_CONNS ({max_conns}); got {reuse!r}."
        )
    min_conns = values["MIN_CONNS"]
    if min_conns > max_conns:
        raise ImproperlyConfigured(
            f"{where}['MIN_CONNS'] must be at most MAX_CONNS ({max_conns}); got {min_conns!r}."
        )
    if min_conns > reuse:
        raise ImproperlyConfigured(
            f"{where}['MIN_CONNS'] must be at most REUSE_CONNS ({reuse}): connections kept "
            f"warm must be kept idle; got {min_conns!r}."
        )
    keepalive = values["KEEPALIVE_INTERVAL"]
    if (
        keepalive is not None
        and values["MAX_IDLE"] is not None
        and keepalive >= values["MAX_IDLE"]
        and not min_conns
    ):
        raise ImproperlyConfigured(
            f"{where}['KEEPALIVE_INTERVAL'] ({keepalive!r}) must be shorter than MAX_IDLE "
            f"({values['MAX_IDLE']!r}), or idle connections expire before their first "
            "keepalive; lower it, raise MAX_IDLE, or set MAX_IDLE to None."
        )
    peers = tuple(values["PEERS"] or ())
    if alias in peers:
        peers = tuple(p for p in peers if p != alias)
    if values["TRANSACTION_POOLING"]:
        _refuse_under_transaction_pooling(alias, settings_dict)
    if values["POOL_MODE"] == TRANSACTION and settings_dict.get("AUTOCOMMIT") is False:
        raise ImproperlyConfigured(
            f"{where}['POOL_MODE'] is 'transaction', but DATABASES[{alias!r}]['AUTOCOMMIT'] is "
            "False: every connection would be one transaction from its first query to the end "
            "of the request, and never given back in between. Keep AUTOCOMMIT=True (use "
            "transaction.atomic() for transactions), or POOL_MODE='session'."
        )
    return PoolSettings(
        max_conns=max_conns,
        reuse_conns=reuse,
        pool_timeout=float(values["POOL_TIMEOUT"]),
        health_check_delay=values["HEALTH_CHECK_DELAY"],
        max_lifetime=values["MAX_LIFETIME"],
        max_idle=values["MAX_IDLE"],
        leak_timeout=values["LEAK_TIMEOUT"],
        connect_retries=values["CONNECT_RETRIES"],
        connect_retry_delay=float(values["CONNECT_RETRY_DELAY"]),
        reset_query=values["RESET_QUERY"],
        peers=peers,
        check_interval=float(values["CHECK_INTERVAL"]),
        stats_log_interval=values["STATS_LOG_INTERVAL"],
        transaction_pooling=values["TRANSACTION_POOLING"],
        min_conns=min_conns,
        keepalive_interval=None if keepalive is None else float(keepalive),
        pool_mode=values["POOL_MODE"],
    )


def _refuse_under_transaction_pooling(alias: str, settings_dict: dict[str, Any]) -> None:
    """Refuse the settings that a transaction-pooling proxy breaks (`ImproperlyConfigured`)."""
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
