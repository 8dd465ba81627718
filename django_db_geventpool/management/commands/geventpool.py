"""``manage.py geventpool drain|resize N|stats [--database ALIAS]``: act on the serving processes.

Reaches every process registered in the control directory (``GEVENTPOOL_CONTROL_DIR``
in the environment or in settings, or ``--control-dir``): the gunicorn workers when
gunicorn.conf.py runs with that variable set. See ``django_db_geventpool.control``.
Needs ``"django_db_geventpool"`` in ``INSTALLED_APPS``.
"""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import control


class Command(BaseCommand):
    help = (
        "Drain, resize or read the pools of the running server processes (the gunicorn "
        "workers registered in GEVENTPOOL_CONTROL_DIR)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("verb", choices=["drain", "resize", "stats"])
        parser.add_argument(
            "max_conns", nargs="?", type=int, help="the new MAX_CONNS (resize only)"
        )
        parser.add_argument("--database", default="default", help="the alias (default: default)")
        parser.add_argument("--control-dir", help="default: GEVENTPOOL_CONTROL_DIR")
        parser.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            help="seconds to wait for the answers (default 10)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verb, max_conns = options["verb"], options["max_conns"]
        if verb == "resize" and (max_conns is None or max_conns < 1):
            raise CommandError("resize needs the new MAX_CONNS, at least 1: geventpool resize 20")
        if verb != "resize" and max_conns is not None:
            raise CommandError(f"{verb} takes no number")
        directory = (
            options["control_dir"]
            or os.environ.get("GEVENTPOOL_CONTROL_DIR")
            or getattr(settings, "GEVENTPOOL_CONTROL_DIR", None)
        )
        if not directory:
            raise CommandError(
                "no control directory: set GEVENTPOOL_CONTROL_DIR for gunicorn and for this "
                "command (or pass --control-dir)"
            )
        answers, silent = control.send(
            directory, verb, options["database"], max_conns, timeout=options["timeout"]
        )
        if not answers and not silent:
            raise CommandError(f"no serving process is registered in {directory}")
        failed = bool(silent)
        for pid in sorted(answers):
            answer = answers[pid]
            if not answer["ok"]:
                failed = True
                self.stderr.write(f"pid {pid}: {answer['error']}")
                continue
            stats = answer.get("stats") or {}
            pairs = " ".join(f"{key}={stats[key]}" for key in sorted(stats))
            done = {
                "drain": f"drained ({answer['result']} idle closed)",
                "resize": f"resized to {max_conns}",
                "stats": "stats",
            }[verb]
            self.stdout.write(f"pid {pid}: {done}: {pairs}")
        for pid in silent:
            self.stderr.write(f"pid {pid}: no answer within {options['timeout']}s")
        if failed:
            raise CommandError("not every process answered")
