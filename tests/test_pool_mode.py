"""POOL_MODE="transaction": a wrapper holds a server connection only while it uses one.

Both drivers run this file. "Given back" is observed from the pool's side
(`held`: connections checked out, as another greenlet sees it) and from the server's
(``pg_stat_activity``), never from the wrapper's private state alone. Every test
that checks a release fails when `PoolModeMixin._release_if_idle` does nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import zoneinfo

import gevent
import pytest
from django.core.signals import request_finished, request_started
from django.db import connection, transaction
from django.db.backends.postgresql.psycopg_any import IsolationLevel, is_psycopg3
from django.db.backends.signals import connection_created
from django.test.utils import CaptureQueriesContext
from gevent.event import Event

from django_db_geventpool import PoolTimeout, get_stats
from django_db_geventpool.utils import close_connection, give_back_connections
from tests.support.eventually import wait_until
from tests.support.helpers import (
    ServerConnectionSampler,
    checkout_timeout,
    interrupt_while_running,
    query,
    raw_connect,
    wait_until_gone,
)
from tests.testapp.models import Item

ROLE = "geventpool_pool_mode_role"


def held() -> int:
    """Connections checked out of the default pool, as any other greenlet sees it.

    A release happens as soon as the greenlet that used the connection waits on
    anything: yield once, as any wait would, before looking.
    """
    gevent.sleep(0)
    stats = get_stats()
    return stats["pool_size"] - stats["pool_available"]


def pid_of_statement() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def run(func, *args):
    """Run ``func`` in a new greenlet (its own Django connection), as one request."""

    def request():
        try:
            return func(*args)
        finally:
            connection.close()

    return gevent.spawn(request).get(timeout=20)


@pytest.fixture
def tx_pool(configure_pool):
    """Transaction mode, one server connection unless told otherwise."""

    def configure(**options):
        options.setdefault("MAX_CONNS", 1)
        options.setdefault("POOL_TIMEOUT", 10)
        return configure_pool(POOL_MODE="transaction", **options)

    return configure


# -- the key property: held only while used ---------------------------------------------


def test_two_greenlets_share_one_connection_between_their_statements(tx_pool):
    """Each queries, waits on something else, queries again: with MAX_CONNS=1 they interleave.

    In session mode the second greenlet's first query waits for the first
    greenlet's request to end, which waits for the second: a PoolTimeout.
    """
    tx_pool(MAX_CONNS=1)
    first_done, second_done = Event(), Event()
    order = []

    def first():
        order.append(("first", pid_of_statement()))
        first_done.set()
        second_done.wait(timeout=30)  # the "external wait"
        order.append(("first", pid_of_statement()))

    def second():
        first_done.wait(timeout=30)
        order.append(("second", pid_of_statement()))
        second_done.set()
        gevent.sleep(0.01)
        order.append(("second", pid_of_statement()))

    with ServerConnectionSampler() as sampler:
        greenlets = [gevent.spawn(run, first), gevent.spawn(run, second)]
        gevent.joinall(greenlets, timeout=20, raise_error=True)
    assert [who for who, _ in order[:2]] == ["first", "second"]
    assert len({pid for _, pid in order}) == 1  # one server connection for both
    assert sampler.peak == 1
    stats = get_stats()
    assert stats["connections_num"] == 1 and stats["requests_errors"] == 0
    assert held() == 0


def test_statements_without_a_wait_between_them_share_one_checkout(tx_pool):
    """The release waits for the greenlet's next wait: back-to-back statements cost one checkout."""
    tx_pool(MAX_CONNS=1)
    pid_of_statement()
    assert held() == 0
    checkouts = get_stats()["requests_num"]
    pids = {pid_of_statement() for _ in range(5)}
    assert get_stats()["requests_num"] == checkouts + 1 and len(pids) == 1
    assert held() == 0  # the first wait gives it back
    for _ in range(3):
        pid_of_statement()
        gevent.sleep(0.001)  # an external wait: a checkout per statement
    assert get_stats()["requests_num"] == checkouts + 4


def test_a_checkout_unused_before_a_wait_goes_back(tx_pool):
    tx_pool(MAX_CONNS=1)
    connection.ensure_connection()
    assert held() == 0
    cursor = connection.cursor()
    assert held() == 0  # a cursor made early holds nothing while the greenlet waits
    cursor.execute("SELECT 41 + 1")
    assert cursor.fetchone() == (42,)
    assert held() == 0
    cursor.close()


def test_is_usable_gives_the_checkout_back(tx_pool):
    """is_usable() runs a statement of its own: a use like any other, released after it."""
    tx_pool(MAX_CONNS=1)
    connection.ensure_connection()
    assert connection.is_usable()  # no wait in between: the checkout is still held
    assert held() == 0
    assert not connection.is_usable()  # nothing held: no connection to test (as Django says)
    pid_of_statement()
    assert held() == 0


def test_session_mode_keeps_the_connection_for_the_request(configure_pool):
    # The contrast that makes the test above meaningful.
    configure_pool(MAX_CONNS=1, POOL_TIMEOUT=30)  # the connect: never a race
    pid_of_statement()
    assert held() == 1
    with checkout_timeout(0.5), pytest.raises(PoolTimeout):
        gevent.spawn(pid_of_statement).get(timeout=30)


def test_orm_reads_and_writes_give_the_connection_back_after_each_statement(tx_pool):
    tx_pool()
    item = Item.objects.create(name="pm-a", value=1)
    assert held() == 0
    Item.objects.filter(pk=item.pk).update(value=2)
    assert held() == 0
    assert Item.objects.get(pk=item.pk).value == 2
    assert held() == 0
    assert list(Item.objects.filter(name="pm-a").values_list("value", flat=True)) == [2]
    assert held() == 0
    Item.objects.filter(pk=item.pk).delete()
    assert held() == 0
    assert not Item.objects.filter(pk=item.pk).exists()
    assert held() == 0
    assert get_stats()["connections_num"] == 1


def test_bulk_create_and_update_or_create(tx_pool):
    tx_pool()
    Item.objects.bulk_create([Item(name="pm-bulk", value=i) for i in range(5)])
    assert held() == 0
    _obj, created = Item.objects.update_or_create(name="pm-uoc", defaults={"value": 1})
    assert created and held() == 0
    _obj, created = Item.objects.update_or_create(name="pm-uoc", defaults={"value": 7})
    assert not created and held() == 0
    assert Item.objects.get(name="pm-uoc").value == 7
    values = Item.objects.filter(name="pm-bulk").values_list("value", flat=True)
    assert sorted(values) == list(range(5))
    assert held() == 0


def test_select_for_update_inside_atomic_holds_one_connection_until_the_end(tx_pool):
    tx_pool(MAX_CONNS=2)
    item = Item.objects.create(name="pm-locked", value=0)
    with transaction.atomic():
        locked = Item.objects.select_for_update().get(pk=item.pk)
        assert held() == 1
        pid = pid_of_statement()
        # Another greenlet cannot take the row lock while this transaction holds it.
        observer = raw_connect()
        try:
            query(observer, "SET lock_timeout = '100ms'")
            with pytest.raises(Exception, match="lock"):
                query(observer, "SELECT 1 FROM testapp_item WHERE id = %s FOR UPDATE", [item.pk])
        finally:
            observer.close()
        locked.value = 1
        locked.save()
        assert pid_of_statement() == pid and held() == 1
    assert held() == 0
    assert Item.objects.get(pk=item.pk).value == 1


def test_nested_atomic_with_savepoints(tx_pool):
    tx_pool()
    with transaction.atomic():
        Item.objects.create(name="pm-outer")
        try:
            with transaction.atomic():
                Item.objects.create(name="pm-inner")
                assert held() == 1
                raise ValueError("roll back the savepoint")
        except ValueError:
            pass
        with transaction.atomic():
            Item.objects.create(name="pm-inner-kept")
        assert held() == 1
    assert held() == 0
    assert sorted(
        Item.objects.filter(name__in=["pm-outer", "pm-inner", "pm-inner-kept"]).values_list(
            "name", flat=True
        )
    ) == ["pm-inner-kept", "pm-outer"]


def test_durable_atomic(tx_pool):
    tx_pool()
    with transaction.atomic(durable=True):
        Item.objects.create(name="pm-durable")
        assert held() == 1
    assert held() == 0
    with pytest.raises(RuntimeError, match="durable"):
        with transaction.atomic():
            with transaction.atomic(durable=True):
                pass
    assert held() == 0
    assert Item.objects.filter(name="pm-durable").count() == 1


def test_on_commit_callbacks_run_after_commit_and_may_query(tx_pool):
    tx_pool()
    seen = []

    def callback():
        seen.append(("count", Item.objects.filter(name="pm-committed").count(), held()))
        Item.objects.create(name="pm-from-callback")

    with transaction.atomic():
        Item.objects.create(name="pm-committed")
        transaction.on_commit(callback)
        transaction.on_commit(lambda: seen.append(("plain", held())))
        assert seen == []
    # The callback's queries ran in autocommit; nothing is held once they are done.
    assert seen == [("count", 1, 0), ("plain", 0)]
    assert held() == 0
    assert Item.objects.filter(name="pm-from-callback").count() == 1
    # Outside atomic() on_commit runs at once, without checking a connection out.
    requests_before = get_stats()["requests_num"]
    transaction.on_commit(lambda: seen.append("immediate"))
    assert seen[-1] == "immediate"
    assert get_stats()["requests_num"] == requests_before
    assert held() == 0


def test_rolled_back_atomic_gives_back_and_drops_callbacks(tx_pool):
    tx_pool()
    seen = []
    with pytest.raises(ValueError):
        with transaction.atomic():
            Item.objects.create(name="pm-rolled-back")
            transaction.on_commit(lambda: seen.append(1))
            raise ValueError
    assert seen == [] and held() == 0
    assert not Item.objects.filter(name="pm-rolled-back").exists()


def test_an_on_commit_callback_that_raises_still_gives_back(tx_pool):
    """The commit is done when a callback raises: the connection goes back all the same."""
    tx_pool(MAX_CONNS=1)
    with pytest.raises(ZeroDivisionError):
        with transaction.atomic():
            Item.objects.create(name="pm-callback-raises")
            transaction.on_commit(lambda: 1 / 0)
    assert held() == 0
    assert Item.objects.filter(name="pm-callback-raises").count() == 1
    # Another greenlet gets the only connection (MAX_CONNS=1, POOL_TIMEOUT=2).
    assert gevent.spawn(run, pid_of_statement).get(timeout=10)
    assert held() == 0


def test_manual_transactions_hold_until_autocommit_is_back(tx_pool):
    tx_pool()
    transaction.set_autocommit(False)
    try:
        Item.objects.create(name="pm-manual-rollback")
        assert held() == 1
        transaction.rollback()
        assert held() == 1  # still in manual mode: the next statement opens a transaction
        Item.objects.create(name="pm-manual-commit")
        transaction.commit()
        assert held() == 1
    finally:
        transaction.set_autocommit(True)
    assert held() == 0
    names = set(Item.objects.filter(name__startswith="pm-manual-").values_list("name", flat=True))
    assert names == {"pm-manual-commit"}


# -- cursors -----------------------------------------------------------------------------


def test_a_cursor_taken_before_a_release_stays_usable(tx_pool):
    # REUSE_CONNS=0: every returned connection is closed. The rows of the last
    # statement must not depend on the connection they came from.
    tx_pool(MAX_CONNS=1, REUSE_CONNS=0)
    cursor = connection.cursor()
    cursor.execute("SELECT g, pg_backend_pid() FROM generate_series(1, 3) g")
    assert held() == 0
    first_pid = pid_of_statement()  # another checkout in between
    assert held() == 0
    assert cursor.fetchone()[0] == 1
    assert [row[0] for row in cursor.fetchall()] == [2, 3]
    cursor.execute("SELECT pg_backend_pid()")  # runs on whatever is checked out now
    (second_pid,) = cursor.fetchone()
    assert held() == 0
    assert first_pid != second_pid  # each statement got a new connection
    cursor.close()
    assert get_stats()["requests_errors"] == 0


def test_the_rows_of_every_cursor_stay_readable_after_a_release(tx_pool):
    """Not only the last statement's: a cursor read after later statements, or after atomic()."""
    # REUSE_CONNS=0: every returned connection is closed.
    tx_pool(MAX_CONNS=1, REUSE_CONNS=0)
    first = connection.cursor()
    first.execute("SELECT g FROM generate_series(1, 3) g")
    with transaction.atomic():
        in_atomic = connection.cursor()
        in_atomic.execute("SELECT 'atomic'")
    last = connection.cursor()
    last.execute("SELECT 'last'")
    assert held() == 0
    assert first.fetchone() == (1,)
    assert in_atomic.fetchall() == [("atomic",)]
    assert last.fetchall() == [("last",)]
    assert first.fetchall() == [(2,), (3,)]
    # A statement that ends an atomic() block: the release comes from the block's end.
    with transaction.atomic():
        ending = connection.cursor()
        ending.execute("SELECT 'end of block'")
    assert held() == 0
    assert ending.fetchone() == ("end of block",)
    for cursor in (first, in_atomic, last, ending):
        cursor.close()
    assert get_stats()["requests_errors"] == 0


@pytest.mark.parametrize("reuse_conns", [1, 0], ids=["reused", "closed-on-return"])
def test_iterating_a_cursor_across_releases_reads_every_row(tx_pool, reuse_conns):
    """``for row in cursor`` with a wait in the loop: every row, whatever the pool did meanwhile."""
    tx_pool(MAX_CONNS=1, REUSE_CONNS=reuse_conns)
    values, held_in_loop = [], []
    with connection.cursor() as cursor:
        cursor.execute("SELECT g FROM generate_series(1, 5) g")
        for (value,) in cursor:
            values.append(value)
            held_in_loop.append(held())  # a wait: the connection goes back
            pid_of_statement()  # and another statement takes one
    assert values == [1, 2, 3, 4, 5]
    assert set(held_in_loop) == {0}
    assert held() == 0


def test_a_cursor_from_an_atomic_block_runs_on_the_next_connection(tx_pool):
    tx_pool(MAX_CONNS=2)
    with transaction.atomic():
        cursor = connection.cursor()
        cursor.execute("SELECT 1")
    assert held() == 0
    # Held by another greenlet: the cursor's old connection is someone else's.
    other_holds = Event()
    release_other = Event()
    other_pid = []

    def other():
        with transaction.atomic():
            other_pid.append(pid_of_statement())
            other_holds.set()
            release_other.wait(timeout=30)

    greenlet = gevent.spawn(run, other)
    other_holds.wait(timeout=30)
    cursor.execute("SELECT pg_backend_pid(), 2")
    pid, two = cursor.fetchone()
    assert two == 2
    assert pid != other_pid[0]  # not on the connection the other greenlet holds
    release_other.set()
    greenlet.get(timeout=30)
    assert held() == 0


def test_server_side_cursor_pins_until_exhausted(tx_pool):
    tx_pool(MAX_CONNS=1)
    Item.objects.bulk_create([Item(name="pm-iter", value=i) for i in range(10)])
    seen_held = []
    values = []
    for item in Item.objects.filter(name="pm-iter").order_by("value").iterator(chunk_size=2):
        values.append(item.value)
        seen_held.append(held())
    assert values == list(range(10))
    assert set(seen_held) == {1}  # pinned between chunks
    assert held() == 0  # exhausted: given back


def test_server_side_cursor_pins_until_closed(tx_pool):
    tx_pool(MAX_CONNS=1)
    Item.objects.bulk_create([Item(name="pm-iter2", value=i) for i in range(10)])
    iterator = Item.objects.filter(name="pm-iter2").iterator(chunk_size=2)
    next(iterator)
    assert held() == 1
    # The same greenlet's other statements run on the pinned connection meanwhile.
    assert Item.objects.filter(name="pm-iter2").count() == 10
    assert held() == 1
    iterator.close()
    assert held() == 0


def test_iterator_without_server_side_cursors(tx_pool):
    from django.db import connections

    tx_pool(MAX_CONNS=1)
    connections.settings["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    Item.objects.bulk_create([Item(name="pm-iter3", value=i) for i in range(7)])
    values = []
    for item in Item.objects.filter(name="pm-iter3").order_by("value").iterator(chunk_size=2):
        values.append(item.value)
        assert held() == 0
    assert values == list(range(7))


def test_raw_connection_access_pins_until_the_wrapper_is_closed(tx_pool):
    tx_pool(MAX_CONNS=1)
    connection.ensure_connection()
    raw = connection.connection
    pid = query(raw, "SELECT pg_backend_pid()")[0][0]
    assert Item.objects.count() >= 0
    assert held() == 1  # not given back after the statement
    assert pid_of_statement() == pid
    assert query(raw, "SELECT pg_backend_pid()")[0][0] == pid  # still this greenlet's
    connection.close()
    assert held() == 0
    # A new checkout is released again after its statements.
    pid_of_statement()
    assert held() == 0


# -- Django's per-connection behaviour -----------------------------------------------------


def test_queries_are_logged_under_debug(tx_pool):
    tx_pool()
    with CaptureQueriesContext(connection) as captured:
        Item.objects.create(name="pm-logged")
        Item.objects.filter(name="pm-logged").count()
        assert held() == 0
    sqls = [q["sql"] for q in captured.captured_queries]
    assert len(sqls) == 2
    assert sqls[0].startswith("INSERT") and "'pm-logged'" in sqls[0]
    assert "COUNT(*)" in sqls[1] and "'pm-logged'" in sqls[1]


def test_connection_created_once_per_server_connection(tx_pool):
    tx_pool(MAX_CONNS=2)
    received = []

    def receiver(sender, connection, **kwargs):
        # The wrapper points at the new server connection: session set-up lands there.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            received.append(cursor.fetchone()[0])

    connection_created.connect(receiver)
    try:
        pids = [run(pid_of_statement) for _ in range(5)]
        both = Event()

        def hold_two():
            with transaction.atomic():
                pids.append(pid_of_statement())
                both.wait(timeout=30)

        greenlet = gevent.spawn(run, hold_two)
        pids.append(run(lambda: [pid_of_statement() for _ in range(3)][-1]))
        both.set()
        greenlet.get(timeout=30)
        # A connector the atomic() block started may still be connecting.
        wait_until(lambda: get_stats()["pool_opening"] == 0)
    finally:
        connection_created.disconnect(receiver)
    assert get_stats()["connections_num"] == 2
    # Once per server connection: two connections, two signals, each on its own
    # connection. (Which of them served the statements depends on the connector
    # and the release order: the second may have gone idle unused.)
    assert len(received) == 2 == len(set(received))
    assert set(pids) <= set(received)


def test_connection_created_receivers_that_look_the_alias_up(tx_pool):
    """django.contrib.postgres's receiver queries through ``connections[alias]``, not its argument.

    The signal is sent in the pool's connector greenlet: ``connections[alias]``
    there must be the wrapper pointing at the new connection, or the receiver
    checks out another connection while the first is still being opened (with
    MAX_CONNS=1, until POOL_TIMEOUT; every connect, so nothing ever works).
    """
    from django.contrib.postgres import signals as postgres_signals
    from django.db import connections

    tx_pool(MAX_CONNS=1)
    seen = []

    def receiver(sender, connection, **kwargs):
        assert connections[connection.alias] is connection
        with connections[connection.alias].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            seen.append(cursor.fetchone()[0])

    # What INSTALLED_APPS = [..., "django.contrib.postgres"] connects, from a cold cache.
    postgres_signals.get_hstore_oids.cache_clear()
    postgres_signals.get_citext_oids.cache_clear()
    # A uid of its own: disconnecting never removes the app's, if it is installed.
    uid = "test_pool_mode.register_type_handlers"
    connection_created.connect(postgres_signals.register_type_handlers, dispatch_uid=uid)
    connection_created.connect(receiver)
    try:
        pid = pid_of_statement()
    finally:
        connection_created.disconnect(receiver)
        connection_created.disconnect(dispatch_uid=uid)
        postgres_signals.get_hstore_oids.cache_clear()
        postgres_signals.get_citext_oids.cache_clear()
    assert seen == [pid]  # run once, on the new connection
    stats = get_stats()
    assert stats["connections_num"] == 1 and stats["requests_errors"] == 0
    assert held() == 0


def test_execute_wrappers_installed_by_connection_created_are_reported(tx_pool, caplog):
    """Receivers that configure the wrapper (django-read-only's write blocker) lose it: said loudly.

    The signal's wrapper is one made for that connect, not any request's: an
    execute wrapper it gets wraps nothing. A WARNING names it, once per server
    connection, rather than the blocker silently doing nothing.
    """
    tx_pool(MAX_CONNS=1)

    def write_blocker(execute, sql, params, many, context):
        raise AssertionError("never called: it was installed on the connect's own wrapper")

    def install_blocker(sender, connection, **kwargs):
        if write_blocker not in connection.execute_wrappers:
            connection.execute_wrappers.insert(0, write_blocker)

    connection_created.connect(install_blocker)
    try:
        with caplog.at_level("WARNING", logger="django_db_geventpool.backends.pool_mode"):
            pid_of_statement()
            pid_of_statement()  # the same server connection: no second report
    finally:
        connection_created.disconnect(install_blocker)
    reports = [r for r in caplog.records if "write_blocker" in r.getMessage()]
    assert len(reports) == 1
    assert "POOL_MODE" in reports[0].getMessage() and reports[0].levelname == "WARNING"
    assert write_blocker not in connection.execute_wrappers
    assert held() == 0


def test_session_time_zone(tx_pool):
    from django.db import connections

    tx_pool(MAX_CONNS=1)
    connections.settings["default"]["TIME_ZONE"] = "Asia/Tokyo"
    tokyo = zoneinfo.ZoneInfo("Asia/Tokyo")

    def statements():
        for _ in range(3):
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT current_setting('TimeZone'), %s::timestamptz",
                    [datetime.datetime(2020, 1, 1, 12, tzinfo=datetime.UTC)],
                )
                zone, stamp = cursor.fetchone()
            assert zone == "Asia/Tokyo"
            assert stamp == datetime.datetime(2020, 1, 1, 21, tzinfo=tokyo)
            assert held() == 0
        stamp = datetime.datetime(2021, 5, 6, 7, 8, tzinfo=datetime.UTC)
        item = Item.objects.create(name="pm-tz", stamp=stamp)
        assert Item.objects.get(pk=item.pk).stamp == stamp
        assert held() == 0

    run(statements)  # a fresh wrapper: Django caches its time zone per wrapper
    assert get_stats()["connections_num"] == 1


@pytest.fixture
def role():
    observer = raw_connect()
    try:
        if not query(observer, "SELECT 1 FROM pg_roles WHERE rolname = %s", [ROLE]):
            query(observer, f"CREATE ROLE {ROLE} NOLOGIN")
        query(observer, f"GRANT {ROLE} TO CURRENT_USER")
    finally:
        observer.close()
    return ROLE


@pytest.mark.parametrize("reset_query", [None, "DISCARD ALL"])
def test_assume_role_on_every_statement(tx_pool, role, reset_query):
    tx_pool(MAX_CONNS=1, assume_role=role, RESET_QUERY=reset_query)
    for _ in range(3):
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_user")
            assert cursor.fetchone()[0] == role
        # With a reset query the return runs in a greenlet of its own (it waits on the server).
        wait_until(lambda: held() == 0)
    assert get_stats()["connections_num"] == 1


def test_isolation_level(tx_pool):
    tx_pool(MAX_CONNS=1, isolation_level=IsolationLevel.SERIALIZABLE)
    for _ in range(2):
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT current_setting('transaction_isolation')")
                assert cursor.fetchone()[0] == "serializable"
        assert held() == 0


# -- request ends, close_connection, kills ----------------------------------------------------


def test_request_end_and_close_connection_are_harmless_when_nothing_is_held(tx_pool):
    tx_pool()

    @close_connection
    def task():
        request_started.send(sender=None)
        pid = pid_of_statement()
        assert held() == 0
        request_finished.send(sender=None)
        give_back_connections()
        return pid

    first = gevent.spawn(task).get(timeout=30)
    assert gevent.spawn(task).get(timeout=30) == first
    stats = get_stats()
    assert held() == 0 and stats["connections_num"] == 1
    assert stats["connections_reclaimed"] == 0 and stats["returns_bad"] == 0


def test_close_connection_gives_back_what_an_atomic_block_holds(tx_pool):
    tx_pool()
    inside = Event()

    @close_connection
    def task():
        atomic = transaction.atomic()
        atomic.__enter__()  # left open: close_connection must still give it back
        Item.objects.create(name="pm-never-committed")
        inside.set()

    gevent.spawn(task).get(timeout=30)
    assert inside.is_set() and held() == 0
    assert not Item.objects.filter(name="pm-never-committed").exists()


def test_a_greenlet_killed_between_statements_holds_nothing(tx_pool):
    tx_pool(MAX_CONNS=1)
    between = Event()

    def request():
        pid_of_statement()
        between.set()
        gevent.sleep(30)  # an external wait
        pid_of_statement()

    greenlet = gevent.spawn(request)
    between.wait(timeout=30)
    assert held() == 0  # already back before the kill
    greenlet.kill(timeout=10)
    assert held() == 0 and get_stats()["connections_reclaimed"] == 0
    pid_of_statement()


def test_a_greenlet_killed_inside_atomic_is_rolled_back_as_today(tx_pool):
    tx_pool(MAX_CONNS=1)
    inside = Event()

    def request():
        with transaction.atomic():
            Item.objects.create(name="pm-killed-in-atomic")
            inside.set()
            gevent.sleep(30)

    greenlet = gevent.spawn(request)
    inside.wait(timeout=30)
    assert held() == 1
    greenlet.kill(timeout=10)
    # atomic() rolls back on the way out (GreenletExit is an exception there), or
    # the pool reclaims the connection when the greenlet is gone: either way the
    # insert is undone and the connection is back.
    wait_until(lambda: held() == 0)
    assert not Item.objects.filter(name="pm-killed-in-atomic").exists()
    assert get_stats()["connections_num"] == 1


def test_a_greenlet_killed_during_a_statement_loses_that_connection(tx_pool):
    tx_pool(MAX_CONNS=1)
    pids = []

    def request():
        pids.append(pid_of_statement())  # released again
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(30)")

    greenlet = gevent.spawn(request)
    observer = raw_connect()
    try:
        sleeping = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
        )
        wait_until(lambda: query(observer, sleeping)[0][0] == 1)
        assert held() == 1
        greenlet.kill(timeout=30)
        wait_until(lambda: held() == 0)
        # Discarded, never reused (as in session mode).
        assert pid_of_statement() != pids[0]
        assert get_stats()["connections_num"] == 2
    finally:
        # psycopg2 cannot cancel the interrupted query: end its backend, or it would
        # sleep on into the next tests, which count the pool's backends.
        for pid in pids:
            query(observer, "SELECT pg_terminate_backend(%s)", [pid])
        wait_until_gone(observer, *pids)
        observer.close()


def test_a_statement_interrupted_outside_atomic_gives_its_connection_up(tx_pool):
    """A ``gevent.Timeout`` caught around a statement: the request goes on, holding nothing.

    The interrupted connection is closed (never reused) and the wrapper holds
    nothing at once; with MAX_CONNS=1 the next statement gets the slot back once
    the pool has cancelled the query, and works.
    """
    tx_pool(MAX_CONNS=1)
    first = pid_of_statement()
    after = {}

    def request():
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(30)")
        except gevent.Timeout:
            # The wrapper let go at once; the slot stays taken until the pool's
            # cancel has ended the query, and the next statement waits for it.
            after["wrapper holds"] = connection.connection is not None
            after["pid"] = pid_of_statement()
            after["held again"] = held()
        finally:
            connection.close()

    interrupt_while_running(request, "SELECT pg_sleep(30)")
    assert after == {"wrapper holds": False, "pid": after["pid"], "held again": 0}
    assert after["pid"] != first
    stats = get_stats()
    assert stats["connections_num"] == 2 and stats["returns_bad"] == 1


def test_a_timeout_before_the_statement_was_sent_gives_the_connection_back(tx_pool):
    """Interrupted in an execute wrapper before the SQL went out: clean, so reused."""
    tx_pool(MAX_CONNS=1)
    first = pid_of_statement()
    waiting = Event()
    after = {}

    def waits_on_something_else(execute, sql, params, many, context):
        waiting.set()
        gevent.sleep(30)  # an external wait the timeout cuts short
        return execute(sql, params, many, context)

    def request():
        try:
            with connection.execute_wrapper(waits_on_something_else):
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
        except gevent.Timeout:
            after["held"] = held()
            after["pid"] = pid_of_statement()
        finally:
            connection.close()

    greenlet = gevent.spawn(request)  # the timeout is thrown into this very greenlet
    assert waiting.wait(timeout=10)
    greenlet.kill(gevent.Timeout(), block=False)
    greenlet.get(timeout=20)
    assert after == {"held": 0, "pid": first}  # given back clean, not discarded
    stats = get_stats()
    assert stats["connections_num"] == 1 and stats["returns_bad"] == 0


# -- Django code no test above names ----------------------------------------------------------


def test_everyday_django_code_runs_and_gives_back(tx_pool):
    """A sweep of ORM and connection APIs, with a second greenlet sharing MAX_CONNS=1."""
    from django.core.management import call_command
    from django.db.models import Count, F, Max
    from gevent.lock import Semaphore

    tx_pool(MAX_CONNS=1)
    stop = Event()
    other_statements = []
    # Held by the other greenlet around each of its statements, and by the test
    # while it counts what is checked out (which must then be nothing).
    between = Semaphore()

    def other():
        while not stop.is_set():
            with between:
                other_statements.append(pid_of_statement())
            gevent.sleep(0.001)

    greenlet = gevent.spawn(run, other)
    try:
        steps = [
            lambda: Item.objects.get_or_create(name="pm-sweep", defaults={"value": 1}),
            lambda: Item.objects.get_or_create(name="pm-sweep", defaults={"value": 1}),
            lambda: Item.objects.filter(name="pm-sweep").update(value=F("value") + 1),
            lambda: Item.objects.aggregate(Max("value"), Count("id")),
            lambda: list(Item.objects.values("name").annotate(n=Count("id")).order_by("name")),
            lambda: list(
                Item.objects.raw("SELECT * FROM testapp_item WHERE name = %s", ["pm-sweep"])
            ),
            lambda: Item.objects.filter(name="pm-sweep").explain(),
            lambda: Item.objects.in_bulk(field_name="id"),
            lambda: list(Item.objects.filter(name="pm-sweep").values_list("value", flat=True)),
            lambda: connection.introspection.table_names(),
            lambda: call_command("migrate", verbosity=0),
            lambda: Item.objects.filter(name="pm-sweep").first().save(),
        ]
        for number, step in enumerate(steps):
            step()
            with between:
                assert held() == 0, number
        with pytest.raises(transaction.TransactionManagementError):
            list(Item.objects.select_for_update().filter(name="pm-sweep"))
        assert held() == 0
    finally:
        stop.set()
        greenlet.get(timeout=30)
    assert Item.objects.get(name="pm-sweep").value == 2
    assert other_statements and get_stats()["requests_errors"] == 0
    assert get_stats()["connections_num"] == 1


if is_psycopg3:
    # psycopg2 cannot COPY at all with a wait callback (psycogreen): psycopg 3 only.

    @pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug-cursor"])
    def test_copy_after_a_release_runs_on_a_checked_out_connection(tx_pool, debug):
        tx_pool(MAX_CONNS=1)
        sql = "COPY (SELECT g FROM generate_series(1, 3) g) TO STDOUT"
        with CaptureQueriesContext(connection) if debug else contextlib.nullcontext():
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                assert held() == 0
                with cursor.copy(sql) as copy:
                    rows = [bytes(row).decode().strip() for row in copy]
                # COPY pins the checkout: held until the wrapper closes.
                assert held() == 1
        assert rows == ["1", "2", "3"]
        connection.close()
        assert held() == 0
