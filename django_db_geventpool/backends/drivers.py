"""What the pool needs from each driver, for the driver Django itself loaded.

Django's PostgreSQL backend picks psycopg 3 whenever it is importable, else
psycopg2; `driver_ops()` follows that choice rather than importing a driver of its
own. Each class also makes sure its driver yields to the gevent hub instead of
blocking it (`ensure_cooperative`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

from django.core.exceptions import ImproperlyConfigured

__all__ = ["Psycopg3Ops", "Psycopg2Ops", "driver_ops"]

logger = logging.getLogger(__name__)

#: psycopg2 only: how often (ms) the server checks that the client of a running
#: query is still there (see `Psycopg2Ops.configure_session`).
CLIENT_CHECK_INTERVAL_MS = 1000


def _gevent_patched(module: str) -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched(module))


class _DBAPIOps:
    """What both drivers do alike, through the DB-API connection methods."""

    #: The driver's connect errors worth a retry (the pool's `DriverOps` protocol).
    connect_errors: tuple[type[BaseException], ...]

    #: True if the driver itself applies libpq's ``connect_timeout`` to an
    #: asynchronous (gevent) connect.
    enforces_connect_timeout = False

    @contextlib.contextmanager
    def connect_deadline(self, params: dict[str, Any], fallback: float) -> Iterator[None]:
        """Bound one connect: libpq's ``connect_timeout`` if set, else ``fallback`` seconds.

        Expiry raises the driver's OperationalError, so a server that never
        answers is a connect error like a refusing one (a peer is marked down).
        libpq's rules: per host, at least 2 s, 0 or absent for none.
        """
        import gevent

        try:
            per_host = int(params.get("connect_timeout") or 0)
        except (TypeError, ValueError):
            per_host = 0
        if per_host > 0:
            if self.enforces_connect_timeout:
                yield
                return
            hosts = str(params.get("host") or "").count(",") + 1
            seconds = float(max(per_host, 2) * hosts)
            what = f"connect_timeout={per_host}s"
        else:
            seconds = fallback
            what = f"no connect_timeout set; bounded by POOL_TIMEOUT={fallback:g}s"
        deadline = gevent.Timeout(seconds)
        deadline.start()
        try:
            yield
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            raise self.connect_errors[0](f"connection timeout expired ({what})") from None
        finally:
            deadline.close()

    def resolve_hosts(self, params: dict[str, Any]) -> dict[str, Any]:
        """The connection parameters, with host names resolved without blocking the hub.

        The default: the driver resolves names itself, cooperatively (psycopg 3 looks
        them up in Python, through the socket module gevent patched).
        """
        return params

    def configure_session(self, raw: Any) -> bool:
        """Session settings the pool needs on a new connection; True if a statement ran."""
        return False

    @staticmethod
    def rollback(raw: Any) -> None:
        raw.rollback()

    @staticmethod
    def commit(raw: Any) -> None:
        raw.commit()

    @staticmethod
    def restore_autocommit(raw: Any) -> None:
        if not raw.autocommit:
            raw.autocommit = True

    @staticmethod
    def close(raw: Any) -> None:
        raw.close()


class Psycopg3Ops(_DBAPIOps):
    """psycopg 3 connections (``psycopg.Connection``)."""

    name = "psycopg 3"

    # psycopg 3 applies connect_timeout itself, per host, to its gevent-friendly connect.
    enforces_connect_timeout = True

    def __init__(self) -> None:
        import psycopg

        self.connect_errors = (psycopg.OperationalError,)

    @staticmethod
    def read_only(raw: Any) -> bool:
        """The server said (ParameterStatus, PostgreSQL 14+) that it refuses writes."""
        status = raw.pgconn.parameter_status
        return (
            status(b"default_transaction_read_only") == b"on" or status(b"in_hot_standby") == b"on"
        )

    @staticmethod
    def ensure_cooperative(alias: str) -> None:
        """Refuse a psycopg that would block the hub: imported before gevent patched select."""
        if not _gevent_patched("select"):
            # No gevent patching at all (manage.py, a plain script): there is no
            # other greenlet to yield to, and psycopg's C wait is fine.
            return
        import psycopg.waiting as waiting

        if "PSYCOPG_WAIT_FUNC" in os.environ:
            return
        if waiting.wait is getattr(waiting, "wait_c", None):
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]: psycopg was imported before gevent.monkey.patch_all(), "
                "so its queries would block every greenlet of the process. Patch first: run "
                "under `python -m gevent.monkey`, or call gevent.monkey.patch_all() at the very "
                "top of manage.py / wsgi.py / celery app, or start gunicorn with "
                "`-c gunicorn.conf.py` (it patches before Django loads)."
            )

    @staticmethod
    def is_closed(raw: Any) -> bool:
        return raw.closed or raw.broken

    @staticmethod
    def fileno(raw: Any) -> int:
        return raw.pgconn.socket

    @staticmethod
    def transaction_status(raw: Any) -> int:
        # libpq's PGTransactionStatusType: the numbering TransactionStatus uses.
        return int(raw.pgconn.transaction_status)

    @staticmethod
    def ping(raw: Any) -> None:
        # An empty query: one round trip, no parsing, no transaction.
        raw.execute("")

    @staticmethod
    def execute(raw: Any, sql: str) -> None:
        raw.execute(sql)

    @staticmethod
    def cancel(raw: Any) -> None:
        # With libpq 17+ (psycopg-binary has it) the cancel request yields to
        # the hub; an older libpq falls back to a short blocking cancel.
        raw.cancel_safe(timeout=5.0)


class Psycopg2Ops(_DBAPIOps):
    """psycopg2 connections, made cooperative with psycogreen's wait callback."""

    name = "psycopg2"

    def __init__(self) -> None:
        import psycopg2

        self.connect_errors = (psycopg2.OperationalError,)

    @staticmethod
    def ensure_cooperative(alias: str) -> None:
        """Install psycogreen's gevent wait callback if no wait callback is set."""
        import psycopg2.extensions

        if psycopg2.extensions.get_wait_callback() is not None:
            return
        try:
            from psycogreen.gevent import patch_psycopg
        except ImportError:
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]: psycopg2 has no gevent wait callback, so its queries "
                "would block every greenlet. Install psycogreen "
                "(pip install 'django-db-geventpool[psycopg2]')."
            ) from None
        patch_psycopg()
        logger.info("installed psycogreen's gevent wait callback for psycopg2")

    def resolve_hosts(self, params: dict[str, Any]) -> dict[str, Any]:
        """Look host names up through gevent (``hostaddr``), never in libpq.

        libpq resolves a host name with a blocking ``getaddrinfo()`` before its
        non-blocking connect starts, so a slow DNS server would freeze every greenlet
        of the process (measured: 15 s for 5 connects to a name whose DNS server
        never answered). Looked up here, through the socket module gevent patched,
        the lookup yields and the connect deadline bounds it. Each name becomes one
        entry per address (as psycopg 3 does), ``host`` kept for TLS and passfile;
        names that do not resolve are dropped, and if none resolves the error is
        libpq's. Parameters that already set ``hostaddr`` are left alone.
        """
        host = params.get("host")
        if not host or params.get("hostaddr"):
            return params
        hosts = str(host).split(",")
        ports = str(params.get("port") or "").split(",")
        if len(ports) == 1:
            ports *= len(hosts)
        elif len(ports) != len(hosts):
            return params  # libpq reports the mismatch
        new_hosts: list[str] = []
        new_addrs: list[str] = []
        new_ports: list[str] = []
        failure: OSError | None = None
        failed_name = ""
        for name, port in zip(hosts, ports, strict=True):
            if _needs_lookup(name):
                try:
                    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
                except OSError as exc:
                    failure, failed_name = exc, name
                    continue
                addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            else:
                addresses = [""]  # a socket directory or an address: nothing to look up
            for address in addresses:
                new_hosts.append(name)
                new_addrs.append(address)
                new_ports.append(port)
        if not new_hosts:
            assert failure is not None
            reason = failure.strerror or str(failure)
            raise self.connect_errors[0](
                f'could not translate host name "{failed_name}" to address: {reason}'
            )
        if not any(new_addrs):
            return params
        resolved = {**params, "host": ",".join(new_hosts), "hostaddr": ",".join(new_addrs)}
        if params.get("port"):
            resolved["port"] = ",".join(new_ports)
        return resolved

    @staticmethod
    def read_only(raw: Any) -> bool:
        """The server said (ParameterStatus, PostgreSQL 14+) that it refuses writes."""
        status = raw.get_parameter_status
        return status("default_transaction_read_only") == "on" or status("in_hot_standby") == "on"

    @staticmethod
    def is_closed(raw: Any) -> bool:
        return raw.closed != 0

    @staticmethod
    def fileno(raw: Any) -> int:
        return raw.fileno()

    @staticmethod
    def transaction_status(raw: Any) -> int:
        return raw.info.transaction_status

    @staticmethod
    def ping(raw: Any) -> None:
        # psycopg2 refuses an empty query; SELECT 1 is the cheapest round trip.
        with raw.cursor() as cursor:
            cursor.execute("SELECT 1")

    @staticmethod
    def execute(raw: Any, sql: str) -> None:
        with raw.cursor() as cursor:
            cursor.execute(sql)

    def configure_session(self, raw: Any) -> bool:
        """Make the server end a query whose client went away (PostgreSQL 14+).

        psycopg2 closes a connection whose query was interrupted (a gevent.Timeout,
        a kill) without cancelling the query, and its ``cancel()`` would block the
        hub: the backend ran on to the end of the query, a server connection beyond
        MAX_CONNS (measured: 6 backends for MAX_CONNS=2, for the 20 s of the
        query). With ``client_connection_check_interval`` the server notices the
        closed socket within that interval and ends the backend. A value the user
        set (``options``, ALTER ROLE/DATABASE ... SET) is kept.
        """
        if raw.server_version < 140000:
            return False
        with raw.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('client_connection_check_interval', %s, false) "
                "WHERE current_setting('client_connection_check_interval') = '0'",
                (str(CLIENT_CHECK_INTERVAL_MS),),
            )
        return True

    @staticmethod
    def cancel(raw: Any) -> None:
        # psycopg2 closes a connection itself when its wait is interrupted, and
        # its cancel() would block the hub while it connects: the server ends the
        # query itself (client_connection_check_interval, see configure_session).
        return None


def _needs_lookup(host: str) -> bool:
    """True for a host name; False for a socket directory (or abstract socket) or an address."""
    if not host or host.startswith(("/", "@")):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


_driver_ops: Psycopg3Ops | Psycopg2Ops | None = None


def driver_ops() -> Psycopg3Ops | Psycopg2Ops:
    """The operations of the driver Django's PostgreSQL backend loaded."""
    global _driver_ops
    if _driver_ops is None:
        from django.db.backends.postgresql.psycopg_any import is_psycopg3

        _driver_ops = Psycopg3Ops() if is_psycopg3 else Psycopg2Ops()
    return _driver_ops
