"""drain(), resize() and the readiness probe, against the real PostgreSQL of the suite."""

from __future__ import annotations

import json
import logging

import gevent
import pytest
from django.db import connection
from django.test import RequestFactory
from gevent.event import Event

import django_db_geventpool
from django_db_geventpool import get_stats, readiness, registry, signals
from django_db_geventpool.views import ready_view
from tests.support.eventually import wait_until
from tests.support.helpers import (
    backend_pid,
    pool_pids,
    raw_connect,
    request_pid,
    terminate_backend,
    wait_until_gone,
)


class Holder:
    """A greenlet that checks out a connection and keeps it until `release`."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.after: int | None = None  # the backend pid seen by a query after release()
        self._release = Event()
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            self.pid = backend_pid()
            self._release.wait()
            self.after = backend_pid()  # still the same connection: never taken away
        finally:
            connection.close()

    def holding(self) -> bool:
        return self.pid is not None

    def release(self) -> None:
        self._release.set()
        self.greenlet.get(timeout=30)


@pytest.fixture
def observer():
    conn = raw_connect()
    yield conn
    conn.close()


def test_drain_closes_idle_now_and_in_use_on_return(configure_pool, observer, caplog):
    caplog.set_level(logging.INFO, logger="django_db_geventpool.pool")
    configure_pool(MAX_CONNS=4)
    holder = Holder()
    wait_until(holder.holding)
    idle_pid = request_pid()
    assert pool_pids(observer) == {holder.pid, idle_pid}

    assert django_db_geventpool.drain() == 1
    wait_until_gone(observer, idle_pid)
    assert holder.pid in pool_pids(observer)  # the holder keeps its connection meanwhile

    holder.release()
    assert holder.after == holder.pid
    wait_until_gone(observer, holder.pid)
    fresh = request_pid()
    assert fresh not in (holder.pid, idle_pid)
    assert pool_pids(observer) == {fresh}
    assert any(
        "drained: 1 idle connections closed, 1 in use" in r.getMessage() for r in caplog.records
    )


def test_drain_replaces_a_connection_whose_connect_was_in_flight(configure_pool, observer):
    """A connect begun before the drain (its post-reconnect hook still running) is old.

    The request queued for it gets a fresh server connection instead, and that one
    connection is closed: after the drain, only new backends serve requests.
    """
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=20)
    first = request_pid()  # idle in the pool
    in_hook = Event()
    release = Event()

    def slow_hook(dbwrapper):
        in_hook.set()
        assert release.wait(30), "the test never released the hook"

    signals.add_post_reconnect_hook(slow_hook)
    try:
        # The pool finds the idle one broken at the next checkout: its replacement
        # is a reconnect, whose hook holds the new connection in the connector.
        terminate_backend(first)
        wait_until_gone(observer, first)
        waiter = gevent.spawn(request_pid)
        assert in_hook.wait(20)
        (in_flight,) = pool_pids(observer)  # connected, not yet in the pool
        assert get_stats()["pool_opening"] == 1
        django_db_geventpool.drain()
        signals.remove_reconnect_hook(slow_hook)
        release.set()
        served = waiter.get(timeout=20 + 10)
        wait_until_gone(observer, in_flight)
    finally:
        signals.remove_reconnect_hook(slow_hook)
        release.set()
    assert served not in (first, in_flight)
    assert {request_pid() for _ in range(3)} == {served}
    assert pool_pids(observer) == {served}
    stats = get_stats()
    assert (stats["pool_size"], stats["requests_errors"], stats["requests_timeouts"]) == (1, 0, 0)


def test_shrinking_waits_for_returns_and_never_takes_a_connection(configure_pool, observer):
    configure_pool(MAX_CONNS=3, POOL_TIMEOUT=20)
    holders = [Holder() for _ in range(3)]
    wait_until(lambda: all(h.holding() for h in holders))
    django_db_geventpool.resize("default", 1)
    assert get_stats()["pool_max"] == 1

    waiter = gevent.spawn(request_pid)
    wait_until(lambda: get_stats()["requests_waiting"] == 1)
    holders[0].release()
    holders[1].release()
    # Both returned connections were closed, not handed to the waiter: one left.
    wait_until_gone(observer, holders[0].pid, holders[1].pid)
    assert pool_pids(observer) == {holders[2].pid}
    assert not waiter.ready() and get_stats()["requests_waiting"] == 1

    holders[2].release()
    assert waiter.get(timeout=30) == holders[2].pid  # under the new cap: reused
    assert [h.after for h in holders] == [h.pid for h in holders]
    stats = get_stats()
    assert stats["pool_size"] == stats["pool_available"] == 1
    assert pool_pids(observer) == {holders[2].pid}


def test_growing_serves_a_waiter_at_once(configure_pool, observer, caplog):
    caplog.set_level(logging.INFO, logger="django_db_geventpool.pool")
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=20)
    holder = Holder()
    wait_until(holder.holding)
    waiter = gevent.spawn(request_pid)
    wait_until(lambda: get_stats()["requests_waiting"] == 1)

    django_db_geventpool.resize("default", 2)
    served = waiter.get(timeout=30)  # while the holder still holds
    assert served != holder.pid and holder.greenlet.dead is False
    assert pool_pids(observer) == {holder.pid, served}
    holder.release()
    assert get_stats()["pool_max"] == 2
    assert any("resized: max_size 1 -> 2" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", [0, -1, "3", True])
def test_resize_refuses_a_bad_cap(value):
    with pytest.raises(ValueError, match="max_conns"):
        django_db_geventpool.resize("default", value)


# -- readiness ------------------------------------------------------------------------


def _ready() -> tuple[int, dict]:
    response = ready_view(RequestFactory().get("/ready"))
    assert response["Cache-Control"] == "no-store"
    return response.status_code, json.loads(response.content)


def test_ready_when_the_pool_can_serve(configure_pool):
    configure_pool(MAX_CONNS=2)
    assert _ready() == (200, {"ready": True, "databases": {"default": "ok"}})
    stats = get_stats()
    # The probe's checkout was given back.
    assert stats["pool_size"] == stats["pool_available"] == 1


def test_a_storm_of_probes_puts_at_most_one_checkout_in_the_queue(configure_pool):
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=20)
    holder = Holder()
    wait_until(holder.holding)
    before = get_stats()["requests_num"]
    waiting_seen: list[int] = []
    sampling = True

    def sample() -> None:
        while sampling:
            waiting_seen.append(get_stats()["requests_waiting"])
            gevent.sleep(0.005)

    sampler = gevent.spawn(sample)
    probes = [gevent.spawn(readiness.check, "default", 0.5) for _ in range(100)]
    gevent.joinall(probes, raise_error=True)
    sampling = False
    sampler.join()
    holder.release()

    answers = {p.value for p in probes}
    assert answers == {"pool exhausted: no connection free within 0.5s"}
    assert max(waiting_seen) == 1  # the one probe's checkout, not 100
    assert get_stats()["requests_num"] - before == 1
    assert _ready()[0] == 200  # and ready again once the connection is back


def test_not_ready_while_the_server_is_down(configure_pool, cluster):
    configure_pool(MAX_CONNS=2, CONNECT_RETRIES=0)
    request_pid()  # an idle connection that the stop will break
    cluster.stop("fast")
    try:
        status, body = _ready()
    finally:
        cluster.start()
    assert status == 503
    assert body["ready"] is False
    assert body["databases"]["default"].startswith("database unavailable")
    wait_until(lambda: _ready()[0] == 200)


def test_not_ready_when_the_pool_is_closed(configure_pool):
    configure_pool()
    request_pid()
    registry.aliases["default"].pool.close()
    assert _ready() == (503, {"ready": False, "databases": {"default": "pool closed"}})
