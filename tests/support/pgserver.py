"""A throwaway PostgreSQL cluster: initdb + pg_ctl in a temporary directory.

Used by the test suite, the demo and the benchmark. The cluster listens on a unix
socket in its directory and on a free loopback TCP port. When run as root, the
server runs as the ``postgres`` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["PostgresCluster", "ServerBinariesMissing", "free_port"]

SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")


class ServerBinariesMissing(RuntimeError):
    """initdb/pg_ctl/postgres are not on PATH."""


def _find_server_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise ServerBinariesMissing(
        f"PostgreSQL server binary {name!r} not found: install the server "
        "(Debian: apt-get install postgresql) or put its bin/ directory on PATH."
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """One PostgreSQL server in a temporary directory; `start`, `stop`, `restart`."""

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        auth: str = "trust",
        superuser: str = "postgres",
        password: str = "postgres",
        initialize: bool = True,
    ) -> None:
        self.binaries = {name: _find_server_binary(name) for name in SERVER_BINARIES}
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.superuser = superuser
        self.password = password
        self.auth = auth
        self.settings = {
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "64MB",
            **(settings or {}),
        }
        self.run_as = None
        if os.geteuid() == 0:
            self.run_as = pwd.getpwnam("postgres")
        self.root = Path(tempfile.mkdtemp(prefix="geventpool-pg-"))
        self.datadir = self.root / "data"
        self.socket_dir = str(self.root)
        self.logfile = self.root / "server.log"
        if self.run_as is not None:
            os.chown(self.root, self.run_as.pw_uid, self.run_as.pw_gid)
        if initialize:
            self._initdb()

    # -- commands ---------------------------------------------------------------

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        def demote() -> None:
            if self.run_as is not None:
                os.setgid(self.run_as.pw_gid)
                os.setuid(self.run_as.pw_uid)

        env = {**os.environ, "LC_ALL": "C", "PGPASSWORD": self.password}
        result = subprocess.run(
            argv,
            preexec_fn=demote,
            env=env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if check and result.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}\n{log[-3000:]}")
        return result

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.run_as is not None:
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
        self._run(
            [
                self.binaries["initdb"],
                "-D",
                str(self.datadir),
                "-U",
                self.superuser,
                "--pwfile",
                str(pwfile),
                "-A",
                self.auth,
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        conf = self.datadir / "postgresql.conf"
        extra = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            **{
                k: v if v.replace(".", "").isdigit() or v in ("on", "off") else f"'{v}'"
                for k, v in self.settings.items()
            },
        }
        with conf.open("a") as f:
            for key, value in extra.items():
                f.write(f"{key} = {value}\n")

    def start(self) -> None:
        self._run(
            [
                self.binaries["pg_ctl"],
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(
            [self.binaries["pg_ctl"], "-D", str(self.datadir), "-m", mode, "-w", "stop"],
            check=False,
        )

    def restart(self, mode: str = "fast") -> None:
        self._run(
            [
                self.binaries["pg_ctl"],
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
                "restart",
            ]
        )

    def promote(self) -> None:
        """Promote a standby to a primary (``pg_ctl promote``), once it accepts writes."""
        self._run([self.binaries["pg_ctl"], "-D", str(self.datadir), "-w", "-t", "60", "promote"])

    @classmethod
    def standby_of(cls, primary: PostgresCluster) -> PostgresCluster:
        """A streaming standby of ``primary`` (``pg_basebackup -R``), not started yet.

        It listens on a port and socket directory of its own; ``hot_standby`` lets
        it serve read-only sessions, which report ``in_hot_standby = on``.
        """
        standby = cls(
            superuser=primary.superuser,
            password=primary.password,
            auth=primary.auth,
            initialize=False,
        )
        standby._run(
            [
                _find_server_binary("pg_basebackup"),
                "-D",
                str(standby.datadir),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                primary.socket_dir,
                "-p",
                str(primary.port),
                "-U",
                primary.superuser,
                "--no-sync",
            ]
        )
        with (standby.datadir / "postgresql.conf").open("a") as f:
            # Later lines win over the primary's copied ones.
            f.write(f"port = {standby.port}\n")
            f.write(f"unix_socket_directories = '{standby.socket_dir}'\n")
            f.write("hot_standby = on\n")
        return standby

    def is_running(self) -> bool:
        result = self._run(
            [self.binaries["pg_ctl"], "-D", str(self.datadir), "status"], check=False
        )
        return result.returncode == 0

    def destroy(self) -> None:
        if self.datadir.exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- connection settings ------------------------------------------------------

    def database_settings(self, name: str = "postgres", tcp: bool = False) -> dict:
        """A Django ``DATABASES`` entry (without ENGINE/OPTIONS) for this cluster."""
        return {
            "NAME": name,
            "USER": self.superuser,
            "PASSWORD": self.password,
            "HOST": self.host if tcp else self.socket_dir,
            "PORT": str(self.port),
        }

    def dsn(self, dbname: str = "postgres", tcp: bool = False) -> str:
        host = self.host if tcp else self.socket_dir
        return (
            f"host={host} port={self.port} dbname={dbname} user={self.superuser} "
            f"password={self.password}"
        )

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with psql as the superuser; return its unaligned output."""
        psql = shutil.which("psql") or str(Path(self.binaries["initdb"]).with_name("psql"))
        result = self._run(
            [
                psql,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.socket_dir,
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                dbname,
                "-c",
                sql,
            ]
        )
        return result.stdout.strip()


def main() -> None:  # pragma: no cover - a manual helper
    cluster = PostgresCluster()
    cluster.start()
    print(cluster.dsn(), file=sys.stderr)
    try:
        input("running; press Enter to stop\n")
    finally:
        cluster.destroy()


if __name__ == "__main__":  # pragma: no cover
    main()
