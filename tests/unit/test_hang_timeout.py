"""A hung test fails on its own, after the per-test timeout, with the stacks of its greenlets.

Runs pytest in a child process on a file of tests that hang in the three ways a
gevent test can: parked on a gevent primitive another greenlet holds, blocked in
a (patched) sleep, spinning in Python without yielding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).parents[2]

HANGING_TESTS = """
import time

import gevent
import gevent.lock


def hold_forever(lock):
    lock.acquire()
    while True:
        gevent.sleep(0.001)


def test_waits_on_a_lock_another_greenlet_holds():
    lock = gevent.lock.Semaphore(1)
    gevent.spawn(hold_forever, lock)
    gevent.sleep(0.01)
    lock.acquire()


def test_sleeps():
    time.sleep(600)


def test_spins():
    while True:
        pass


def test_after_the_hangs_still_runs():
    assert True
"""


def test_a_hung_test_fails_with_its_stacks_and_the_run_goes_on(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "from tests.support.hangs import pytest_timeout_set_timer\n"
    )
    (tmp_path / "test_hanging.py").write_text(HANGING_TESTS)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gevent.monkey",
            "--module",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "--timeout",
            "2",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert "3 failed, 1 passed" in out, out[-4000:]
    assert out.count("Timeout: the test ran for more than 2.0s") >= 3, out[-4000:]
    # The stacks name where each test hangs, and the greenlet holding the lock.
    assert "in test_waits_on_a_lock_another_greenlet_holds" in out
    assert "in hold_forever" in out
    assert "in test_sleeps" in out
    assert "in test_spins" in out
