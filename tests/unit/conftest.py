"""Tests of pure pool logic and option parsing: no PostgreSQL, no Django database."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_pool():
    """Replaces the suite's per-test pool reset: these tests build their own pools."""
    yield
