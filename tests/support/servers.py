"""The real programs the integration tests (and the demo) start: gunicorn, celery, redis.

Each runs in its own process group with its output in a log file, and is stopped
(and waited for) by whoever started it. Everything listens on loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.pgserver import PostgresCluster, free_port

__all__ = [
    "EXAMPLE_DIR",
    "REPO_ROOT",
    "ManagedProcess",
    "example_env",
    "migrate_example",
    "start_gunicorn",
    "start_redis",
    "start_celery_worker",
    "wait_for_port",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO_ROOT / "example"


def wait_for_port(
    port: int,
    deadline: float,
    process: subprocess.Popen | None = None,
    host: str = "127.0.0.1",
) -> None:
    """Return once host:port accepts connections; raise if the process died or time ran out."""
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before listening on {port}"
            )
        try:
            # A numeric address and a plain socket: no getaddrinfo, which would
            # start gevent's resolver thread (and fork() warns about threads).
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.settimeout(0.5)
                probe.connect((host, port))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts connections on {host}:{port}") from None
            time.sleep(0.02)


class ManagedProcess:
    """A child process in its own process group, with its output in ``log_path``."""

    def __init__(self, argv: list[str], *, log_path: Path, env: dict[str, str], cwd: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` to the process, wait for it; kill the whole group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill_group(self) -> None:
        """Last resort at clean-up: SIGKILL to the process group, if anything is left."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self._log.close()


def example_env(cluster: PostgresCluster, dbname: str, **extra: str) -> dict[str, str]:
    """Environment for the example project pointed at ``cluster``'s ``dbname``."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "PGHOST": cluster.socket_dir,
        "PGPORT": str(cluster.port),
        "PGDATABASE": dbname,
        "PGUSER": cluster.superuser,
        "PGPASSWORD": cluster.password,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLE_DIR), str(REPO_ROOT)]),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def migrate_example(cluster: PostgresCluster, dbname: str) -> None:
    """Create ``dbname`` if needed and run the example's migrations in it."""
    exists = cluster.psql(f"SELECT 1 FROM pg_database WHERE datname = '{dbname}'")
    if not exists:
        cluster.psql(f"CREATE DATABASE {dbname}")
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=EXAMPLE_DIR,
        env=example_env(cluster, dbname),
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def start_gunicorn(
    env: dict[str, str],
    log_path: Path,
    *,
    workers: int,
    app: str = "project.wsgi",
    extra_args: tuple[str, ...] = (),
) -> tuple[ManagedProcess, int]:
    """gunicorn with gevent workers through the repository's gunicorn.conf.py; (process, port)."""
    port = free_port()
    env = {**env, "GUNICORN_BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(workers)}
    argv = [_bin("gunicorn"), "-c", str(REPO_ROOT / "gunicorn.conf.py"), *extra_args, app]
    proc = ManagedProcess(argv, log_path=log_path, env=env, cwd=EXAMPLE_DIR)
    try:
        wait_for_port(port, time.monotonic() + 90, proc.process)
    except BaseException:
        proc.kill_group()
        raise
    return proc, port


def start_redis(workdir: Path) -> tuple[ManagedProcess, int]:
    """A throwaway redis-server in ``workdir`` (no persistence); (process, port)."""
    if shutil.which("redis-server") is None:
        raise RuntimeError(
            "redis-server not found: install it (Debian: apt-get install redis-server)"
        )
    port = free_port()
    argv = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "yes",
    ]
    proc = ManagedProcess(argv, log_path=workdir / "redis.log", env=dict(os.environ), cwd=workdir)
    try:
        wait_for_port(port, time.monotonic() + 60, proc.process)
    except BaseException:
        proc.kill_group()
        raise
    return proc, port


def start_celery_worker(env: dict[str, str], log_path: Path, *, concurrency: int) -> ManagedProcess:
    """``celery -A project worker --pool gevent`` of the example project."""
    argv = [
        _bin("celery"),
        "-A",
        "project",
        "worker",
        "--pool",
        "gevent",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--prefetch-multiplier",
        "4",
        "--hostname",
        f"geventpool-test-{os.getpid()}@localhost",
    ]
    return ManagedProcess(argv, log_path=log_path, env=env, cwd=EXAMPLE_DIR)
