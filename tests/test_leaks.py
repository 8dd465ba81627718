"""Connections that are not given back: reported (LEAK_TIMEOUT) and reclaimed.

* ``LEAK_TIMEOUT``: a connection checked out longer than that is reported once, at
  WARNING, with the stack of the code that checked it out; ``connections_leaked``
  counts it. Reporting only: the holder keeps its connection.
* A gevent ``Greenlet`` that ends (returns, raises or is killed) while holding a
  connection gives it back as it ends, through ``rawlink``: no garbage collection
  needed. Other holders (a raw ``greenlet``, a thread) give it back when their
  Django connection wrapper is garbage collected.
"""

import gc
import logging

import gevent
import gevent.event
import greenlet
import pytest
from django.db import connection

from django_db_geventpool import get_stats
from tests.support.eventually import wait_until
from tests.support.helpers import backend_pid
from tests.testapp.models import Item

logger = logging.getLogger(__name__)

LEAK_WARNING = "not returned yet"


def _leak_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if LEAK_WARNING in r.getMessage()]


def test_leak_is_reported_once_with_the_checkout_stack(configure_pool, caplog):
    configure_pool(MAX_CONNS=2, LEAK_TIMEOUT=0.1)
    caplog.set_level(logging.WARNING, logger="django_db_geventpool")
    # Checked out deep inside the ORM (about 15 frames of Django): the report
    # must still reach this test.
    item = Item.objects.create(name="leak")
    pid = backend_pid()
    wait_until(lambda: _leak_warnings(caplog))
    gevent.sleep(0.5)  # five more leak timeouts: still reported once

    warnings = _leak_warnings(caplog)
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].name.startswith("django_db_geventpool")
    assert "test_leak_is_reported_once_with_the_checkout_stack" in warnings[0].getMessage()
    assert get_stats()["connections_leaked"] == 1
    # Reporting only: the holder still has the same server connection.
    assert backend_pid() == pid
    assert get_stats()["pool_size"] == 1
    item.delete()
    connection.close()
    assert get_stats()["pool_available"] == 1


def test_connection_given_back_in_time_is_not_reported(configure_pool, caplog):
    # Each checkout lasts milliseconds: a timeout of seconds cannot be reached even
    # by a busy machine, and the sleep after lets any (wrong) report fire.
    configure_pool(LEAK_TIMEOUT=3.0)
    caplog.set_level(logging.WARNING, logger="django_db_geventpool")
    for _ in range(3):
        backend_pid()
        connection.close()
    gevent.sleep(3.5)
    assert _leak_warnings(caplog) == []
    assert get_stats()["connections_leaked"] == 0


def _forgetful_request(n: int, how: str, holding: gevent.event.Event | None = None) -> int:
    """A greenlet's work that never gives its connection back."""
    Item.objects.filter(name=f"forgotten-{n}").exists()
    if holding is not None:
        holding.set()
    if how == "raise":
        raise ValueError("request failed")
    if how == "killed":
        gevent.sleep(10)
    return n


def _wait_for_reclaims(count: int, timeout: float = 30.0) -> None:
    with gevent.Timeout(timeout, AssertionError(f"fewer than {count} connections reclaimed")):
        while get_stats()["connections_reclaimed"] < count:
            gevent.sleep(0.005)


@pytest.mark.parametrize("how", ["return", "raise", "killed"])
def test_greenlet_ending_without_returning_gives_the_slot_back_without_gc(
    configure_pool, monkeypatch, how
):
    configure_pool(MAX_CONNS=2, POOL_TIMEOUT=10)
    # The hub would print each failed greenlet's traceback; they fail on purpose.
    monkeypatch.setattr(gevent.get_hub(), "exception_stream", None)
    gc.disable()  # only the greenlet's end may give the slots back
    try:
        for n in range(10):
            holding = gevent.event.Event()
            worker = gevent.spawn(_forgetful_request, n, how, holding)
            if how == "killed":
                holding.wait(30)  # killed while it holds the connection
                worker.kill()
            else:
                worker.join()
            assert worker.dead
            if how == "raise":
                assert isinstance(worker.exception, ValueError)
        _wait_for_reclaims(10)  # the last reclaim runs in a greenlet of its own
        stats = get_stats()
        assert stats["requests_errors"] == 0
        assert stats["pool_size"] <= 2
        # Both slots usable at once: two checkouts held together, on two
        # different server connections (each greenlet ends holding its own).
        both_held = gevent.event.Event()
        pids: list[int] = []

        def hold_one() -> None:
            pids.append(backend_pid())
            if len(pids) == 2:
                both_held.set()
            assert both_held.wait(30), "the other slot was not usable meanwhile"

        both = [gevent.spawn(hold_one) for _ in range(2)]
        gevent.joinall(both, raise_error=True)
        assert len(set(pids)) == 2, pids
    finally:
        gc.enable()
    assert get_stats()["pool_size"] <= 2


def test_raw_greenlet_gives_the_slot_back_when_its_wrapper_is_collected(configure_pool):
    """Not a gevent Greenlet: no end-of-greenlet hook, garbage collection reclaims."""
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=10)
    for n in range(3):
        hub = gevent.get_hub()
        # A raw greenlet whose parent is the hub, as servers' handlers are.
        raw = greenlet.greenlet(lambda n=n: _forgetful_request(n, "return"), parent=hub)
        gevent.get_hub().loop.run_callback(raw.switch)
        while not raw.dead:
            gevent.sleep(0.01)
        del raw
        gc.collect()  # Django's wrapper is a reference cycle: only the collector frees it
        _wait_for_reclaims(n + 1)
    assert get_stats()["connections_reclaimed"] == 3
    assert backend_pid()
