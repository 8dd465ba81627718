"""MAX_LIFETIME has up to 10% negative jitter: never before 0.9 x, always by 1 x, spread between.

The pool's clock is replaced by one the test moves, so the answer does not depend on
the machine's speed; the connections are the unit tests' fakes.
"""

from __future__ import annotations

import pytest

from django_db_geventpool import pool as pool_module
from tests.unit.test_pool_unit import Server, make_pool

LIFETIME = 100.0
COUNT = 40  # the chance that 40 uniform expiries all fall on one side of 95 is 2 x 2**-40


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(pool_module, "monotonic", fake)
    return fake


def test_lifetimes_are_spread_over_the_last_tenth(clock):
    server = Server()
    pool = make_pool(max_size=COUNT, max_lifetime=LIFETIME, max_idle=None, health_check_delay=None)
    leases = [pool.checkout(server.open) for _ in range(COUNT)]
    opened_at = clock.now

    clock.now = opened_at + LIFETIME * 0.9 - 0.01  # just before the earliest expiry
    for lease in leases:
        pool.checkin(lease)
    assert pool.get_stats()["connections_expired"] == 0

    leases = [pool.checkout(server.open) for _ in range(COUNT)]
    assert len(server.opened) == COUNT  # all reused
    clock.now = opened_at + LIFETIME * 0.95
    for lease in leases:
        pool.checkin(lease)
    expired = pool.get_stats()["connections_expired"]
    assert 0 < expired < COUNT, expired  # some lifetimes end before 95, some after

    clock.now = opened_at + LIFETIME  # the latest expiry
    leases = [pool.checkout(server.open) for _ in range(COUNT)]
    assert len(server.opened) == COUNT + COUNT  # none of the first connections reused
    for lease in leases:
        pool.checkin(lease)
    pool.close()
