"""``pytest tests/unit`` starts no PostgreSQL: the unit tests run on a machine without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import NO_SERVER_ENV

REPO_ROOT = Path(__file__).parents[2]


def test_the_unit_tests_run_with_starting_a_server_forbidden():
    # The conftest refuses to start PostgreSQL when NO_SERVER_ENV is set, so any unit
    # test (or collection step) that needs the server fails this run.
    env = {**os.environ, NO_SERVER_ENV: "1"}
    this_test = "tests/unit/test_no_server.py"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gevent.monkey",
            "--module",
            "pytest",
            "-q",
            "tests/unit",
            "--deselect",
            f"{this_test}::test_the_unit_tests_run_with_starting_a_server_forbidden",
        ],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "error" not in summary and "skipped" not in summary, summary
