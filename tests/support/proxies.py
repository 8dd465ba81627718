"""Real HAProxy and pgbouncer processes in front of a test PostgreSQL.

Each proxy writes its configuration into a temporary directory, listens on a free
loopback port and runs in the foreground as a child of the test process, so a
test can `stop`, `start` and `restart` it under load. The binaries come from the
system (``scripts/install-system-deps``, run by ``make test``, installs them). A
missing binary fails the test with the command to run: no test is skipped.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.pgserver import free_port
from tests.support.servers import wait_for_port

__all__ = ["HAProxy", "PgBouncer", "require_binary"]

logger = logging.getLogger(__name__)


def require_binary(name: str) -> str:
    """The path of ``name``; fail the test, saying how to install it, if it is missing."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    pytest.fail(
        f"{name} is not installed: run scripts/install-system-deps (as root on Debian, it "
        f"installs it; elsewhere it prints the command), or apt-get install {name}"
    )


class _Proxy:
    """A foreground proxy process with a config file in its own temporary directory."""

    binary_name = ""
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.binary = require_binary(self.binary_name)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix=f"geventpool-{self.binary_name}-"))
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def _preexec(self) -> None:
        """Run in the child before exec (switch user, if needed)."""

    def start(self) -> None:
        """Start the proxy and return once it accepts connections."""
        assert self.process is None, "already running"
        log = open(self.root / "output.log", "ab")
        try:
            self.process = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                preexec_fn=self._preexec,
            )
        finally:
            log.close()
        try:
            # Given the process, a proxy that exits (bad config, port taken)
            # fails at once instead of after the deadline.
            wait_for_port(self.port, time.monotonic() + 10, process=self.process, host=self.host)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            output = self.output()[-3000:]
            raise RuntimeError(f"{self.binary_name} did not start ({exc}):\n{output}") from None
        logger.info("%s listening on %s:%d", self.binary_name, self.host, self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the proxy (SIGTERM: both proxies close every connection at once)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def output(self) -> str:
        path = self.root / "output.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class HAProxy(_Proxy):
    """HAProxy in TCP mode forwarding to one PostgreSQL server.

    ``timeout client`` / ``timeout server`` (seconds) close a connection idle that
    long, as load balancers in front of databases do.
    """

    binary_name = "haproxy"

    def __init__(self, backend_host: str, backend_port: int, idle_timeout: float = 1.0) -> None:
        super().__init__()
        ms = int(idle_timeout * 1000)
        self.config = self.root / "haproxy.cfg"
        self.config.write_text(
            "global\n"
            "  maxconn 1000\n"
            "defaults\n"
            "  mode tcp\n"
            "  timeout connect 2s\n"
            f"  timeout client {ms}ms\n"
            f"  timeout server {ms}ms\n"
            "listen postgres\n"
            f"  bind {self.host}:{self.port}\n"
            f"  server pg {backend_host}:{backend_port}\n"
        )

    def argv(self) -> list[str]:
        # -db: stay in the foreground, so the test owns the process.
        return [self.binary, "-db", "-f", str(self.config)]


class PgBouncer(_Proxy):
    """pgbouncer in front of one PostgreSQL server (trust auth to the server).

    Runs as the ``postgres`` user when the tests run as root (pgbouncer refuses
    to run as root).
    """

    binary_name = "pgbouncer"

    def __init__(
        self,
        backend_host: str,
        backend_port: int,
        users: dict[str, str],
        pool_mode: str = "transaction",
        pool_size: int = 2,
        settings: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.run_as = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        userlist = self.root / "userlist.txt"
        userlist.write_text("".join(f'"{user}" "{password}"\n' for user, password in users.items()))
        self.config = self.root / "pgbouncer.ini"
        self.config.write_text(
            "[databases]\n"
            f"* = host={backend_host} port={backend_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = {self.host}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = plain\n"
            f"auth_file = {userlist}\n"
            f"admin_users = {next(iter(users))}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.root / 'pgbouncer.log'}\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
            + "".join(f"{key} = {value}\n" for key, value in (settings or {}).items())
        )
        if self.run_as is not None:
            for path in (self.root, userlist, self.config):
                os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    def _preexec(self) -> None:
        if self.run_as is not None:
            os.setgid(self.run_as.pw_gid)
            os.setuid(self.run_as.pw_uid)

    def argv(self) -> list[str]:
        return [self.binary, str(self.config)]

    def output(self) -> str:
        log = self.root / "pgbouncer.log"
        return super().output() + (log.read_text(errors="replace") if log.exists() else "")
