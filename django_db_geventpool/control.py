"""Operating the pools of running server processes (``manage.py geventpool``).

Each gunicorn worker has its own pools, so a ``drain`` or ``resize`` typed in a
shell must reach every worker. They meet in a *control directory*
(``GEVENTPOOL_CONTROL_DIR``, the same for the server and the command)::

    workers/<pid>             a serving process, registered by `serve` (gunicorn.conf.py
                              calls it in post_worker_init), removed by `unregister`
    requests/<id>.json        a request the command wrote (atomically: temp file, rename)
    answers/<id>.<pid>.json   that process's answer

The command writes the request, then sends `SIGNAL` (``SIGUSR2``) to every
registered pid. Gunicorn does not use ``SIGUSR2`` in its workers (the master uses
it to re-exec, but the command never signals the master), and the handler is
installed only by `serve`, so a process that did not register is never signalled.
On the signal the worker runs, in a greenlet of its own, every request it has not
answered yet, and writes its answer; the command waits for an answer from every
signalled pid (with a deadline), removes the request and prints the answers.
A registered pid that no longer exists is forgotten.

Requests are JSON: ``{"id": ..., "verb": "drain"|"resize"|"stats", "alias": ..., "max_conns": N}``;
answers: ``{"pid": ..., "ok": true, "result": ..., "stats": {...}}`` or ``{"pid": ..., "ok": false,
"error": "..."}``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["SIGNAL", "execute", "send", "serve", "unregister"]

logger = logging.getLogger(__name__)

#: The signal that tells a registered process to read the control directory.
SIGNAL = signal.SIGUSR2

# Request ids this process has answered (process-global: one control directory
# per process, and a worker that forks gets a fresh set, see serve()).
_answered: set[str] = set()
_directory: Path | None = None
# The installed handler, referenced for the life of the process.
_handler: Any = None


def _dirs(directory: Path) -> tuple[Path, Path, Path]:
    workers, requests, answers = (
        directory / "workers",
        directory / "requests",
        directory / "answers",
    )
    for path in (workers, requests, answers):
        path.mkdir(parents=True, exist_ok=True)
    return workers, requests, answers


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


# -- in the serving process -------------------------------------------------------


def serve(directory: str | os.PathLike[str]) -> None:
    """Register this process in ``directory`` and answer requests on `SIGNAL`.

    Call it in each serving process once Django is set up (gunicorn's
    ``post_worker_init``); needs gevent (the handler runs in the hub and spawns).
    """
    global _directory, _handler
    import gevent

    _directory = Path(directory)
    workers, _, _ = _dirs(_directory)
    _answered.clear()
    if _handler is not None:
        _handler.cancel()
    _handler = gevent.signal_handler(SIGNAL, _on_signal)
    (workers / str(os.getpid())).write_text("")
    logger.info("pid %d answers manage.py geventpool requests in %s", os.getpid(), _directory)


def unregister() -> None:
    """Remove this process from the control directory (gunicorn's ``worker_exit``)."""
    if _directory is not None:
        try:
            (_directory / "workers" / str(os.getpid())).unlink()
        except FileNotFoundError:
            pass


def _on_signal() -> None:
    import gevent

    # In the hub: the work (closing connections, reading files) gets a greenlet.
    gevent.spawn(_answer_pending)


def _answer_pending() -> None:
    if _directory is None:
        return
    _, requests, answers = _dirs(_directory)
    for path in sorted(requests.glob("*.json")):
        try:
            request = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # removed meanwhile, or half-written by a foreign tool
        request_id = str(request.get("id"))
        if request_id in _answered:
            continue
        _answered.add(request_id)
        answer = execute(request)
        _write_atomically(answers / f"{request_id}.{os.getpid()}.json", answer)


def execute(request: dict[str, Any]) -> dict[str, Any]:
    """Run one request on this process's pools; the answer (never raises)."""
    from . import drain, get_stats, resize

    verb, alias = request.get("verb"), request.get("alias", "default")
    answer: dict[str, Any] = {"pid": os.getpid(), "ok": True, "result": None}
    try:
        if verb == "drain":
            answer["result"] = drain(alias)
        elif verb == "resize":
            resize(alias, request["max_conns"])
        elif verb != "stats":
            raise ValueError(f"unknown verb {verb!r}")
        answer["stats"] = get_stats(alias)
    except Exception as exc:
        logger.warning("manage.py geventpool %s on %r failed: %s", verb, alias, exc)
        answer = {"pid": os.getpid(), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return answer


# -- in the command ---------------------------------------------------------------


def registered_pids(directory: str | os.PathLike[str]) -> list[int]:
    """The pids registered in ``directory`` that still exist (stale ones are removed)."""
    workers, _, _ = _dirs(Path(directory))
    pids = []
    for path in workers.iterdir():
        if not path.name.isdigit():
            continue
        pid = int(path.name)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except PermissionError:
            pass  # exists, another user's: the signal below will say so
        pids.append(pid)
    return sorted(pids)


def send(
    directory: str | os.PathLike[str],
    verb: str,
    alias: str = "default",
    max_conns: int | None = None,
    timeout: float = 10.0,
) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """Ask every registered process to run ``verb``; (answers by pid, pids that did not answer).

    Waits at most ``timeout`` seconds for the answers.
    """
    directory = Path(directory)
    _, requests, answers = _dirs(directory)
    request_id = uuid.uuid4().hex
    request: dict[str, Any] = {"id": request_id, "verb": verb, "alias": alias}
    if max_conns is not None:
        request["max_conns"] = max_conns
    request_path = requests / f"{request_id}.json"
    _write_atomically(request_path, request)
    signalled = []
    try:
        for pid in registered_pids(directory):
            try:
                os.kill(pid, SIGNAL)
            except ProcessLookupError:
                continue
            signalled.append(pid)
        received: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while True:
            for pid in signalled:
                path = answers / f"{request_id}.{pid}.json"
                if pid not in received and path.exists():
                    received[pid] = json.loads(path.read_text())
                    path.unlink(missing_ok=True)
            if len(received) == len(signalled) or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
    finally:
        request_path.unlink(missing_ok=True)
    return received, [pid for pid in signalled if pid not in received]
