"""A real pgbouncer in transaction mode between the pool and PostgreSQL.

What must be set (and what the backend checks once ``OPTIONS["TRANSACTION_POOLING"]``
declares the proxy): ``DISABLE_SERVER_SIDE_CURSORS = True``; no ``assume_role``;
psycopg 3 keeps Django's default ``prepare_threshold=None``. With those, the ORM,
transactions and the session time zone work with both drivers, and a pgbouncer
restart costs no request that starts after it accepts again.
"""

import logging
from time import monotonic

import gevent
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction
from django.db.backends.postgresql.psycopg_any import is_psycopg3

from django_db_geventpool import get_stats
from django_db_geventpool.backends.options import parse_pool_settings
from tests.support.helpers import query, raw_connect
from tests.support.load import Load
from tests.support.proxies import PgBouncer
from tests.testapp.models import Item

logger = logging.getLogger(__name__)

SERVER_POOL_SIZE = 2


@pytest.fixture
def pgbouncer(cluster, fresh_pool):
    """pgbouncer (transaction mode, 2 server connections) in front of the session cluster.

    The default alias goes through it, declared with TRANSACTION_POOLING.
    """
    bouncer = PgBouncer(
        cluster.host,
        cluster.port,
        users={cluster.superuser: cluster.password},
        pool_mode="transaction",
        pool_size=SERVER_POOL_SIZE,
    )
    bouncer.start()
    _route_default_alias_through(bouncer)
    try:
        yield bouncer
    finally:
        connections["default"].close()
        connections["default"].close_pool()
        bouncer.destroy()


def _route_default_alias_through(bouncer: PgBouncer) -> None:
    """Point the default alias at pgbouncer, declared with TRANSACTION_POOLING."""
    settings_dict = connections.settings["default"]
    settings_dict.update(
        HOST=bouncer.host, PORT=str(bouncer.port), DISABLE_SERVER_SIDE_CURSORS=True
    )
    settings_dict["OPTIONS"]["TRANSACTION_POOLING"] = True


def _server_connections_from_pgbouncer(cluster) -> int:
    # Straight to PostgreSQL: through pgbouncer (where the default alias now
    # points) the observer's own query would take one of its server connections.
    observer = raw_connect(host=cluster.socket_dir, port=cluster.port)
    try:
        # pgbouncer reaches the server over TCP; the observer over the unix socket.
        return query(
            observer,
            "SELECT count(*) FROM pg_stat_activity WHERE client_addr = '127.0.0.1' "
            "AND datname = current_database()",
        )[0][0]
    finally:
        observer.close()


def test_orm_and_transactions_through_transaction_pooling(cluster, pgbouncer, configure_pool):
    configure_pool(MAX_CONNS=6)
    connections.settings["default"]["TIME_ZONE"] = "Asia/Tokyo"
    errors = []
    zones = set()

    def work(n):
        try:
            with transaction.atomic():
                item = Item.objects.create(name=f"pgb-{n}")
                Item.objects.select_for_update().get(pk=item.pk)
            assert Item.objects.filter(name=f"pgb-{n}").count() == 1
            # The same statement many times: psycopg 3 would prepare it after 5
            # runs unless prepare_threshold is None (Django's default).
            for _ in range(8):
                assert Item.objects.filter(pk=item.pk).exists()
            # Chunked reads without a server-side cursor (DISABLE_SERVER_SIDE_CURSORS).
            rows = Item.objects.filter(name__startswith="pgb-").iterator(chunk_size=2)
            names = [i.name for i in rows]
            assert f"pgb-{n}" in names
            with connection.cursor() as cursor:
                cursor.execute("SELECT current_setting('TimeZone')")
                zones.add(cursor.fetchone()[0])
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    try:
        gevent.joinall([gevent.spawn(work, n) for n in range(30)])
        assert errors == []
        # pgbouncer tracks TimeZone and sets it on every server connection it assigns.
        assert zones == {"Asia/Tokyo"}
        assert get_stats()["requests_errors"] == 0
        assert 1 <= _server_connections_from_pgbouncer(cluster) <= SERVER_POOL_SIZE
        if is_psycopg3:
            with connection.cursor():
                assert connection.connection.prepare_threshold is None
    finally:
        connection.close()
        Item.objects.filter(name__startswith="pgb-").delete()


def test_iterator_with_server_side_cursors_breaks_behind_transaction_pooling(
    pgbouncer, configure_pool
):
    """Why DISABLE_SERVER_SIDE_CURSORS is required: a WITH HOLD cursor moves servers."""
    settings_dict = connections.settings["default"]
    settings_dict["OPTIONS"]["TRANSACTION_POOLING"] = False
    settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = False
    configure_pool(MAX_CONNS=2)
    Item.objects.bulk_create([Item(name=f"ssc-{n}") for n in range(3)])
    try:
        rows = Item.objects.filter(name__startswith="ssc-").iterator(chunk_size=1)
        next(rows)  # DECLARE ... WITH HOLD and the first FETCH, on server connection A
        holding = gevent.event.Event()
        release = gevent.event.Event()

        def other_request():
            with transaction.atomic():
                Item.objects.exists()  # A is the idle server connection: it takes A
                holding.set()
                release.wait(30)
            connection.close()

        other = gevent.spawn(other_request)
        holding.wait(30)
        # The next FETCH lands on server connection B. (The driver's own error
        # class may surface: Django's cursor_iter closes the cursor unwrapped.)
        with pytest.raises(Exception, match=r'cursor "_django_curs_\w+" does not exist'):
            list(rows)
        release.set()
        other.join()
    finally:
        connection.close()
        settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = True
        Item.objects.filter(name__startswith="ssc-").delete()

    # Declaring the proxy while server-side cursors are on is refused.
    settings_dict["OPTIONS"]["TRANSACTION_POOLING"] = True
    settings_dict["DISABLE_SERVER_SIDE_CURSORS"] = False
    with pytest.raises(ImproperlyConfigured, match="DISABLE_SERVER_SIDE_CURSORS"):
        configure_pool()
        connection.ensure_connection()


def test_settings_that_cannot_work_are_refused():
    base = {"DISABLE_SERVER_SIDE_CURSORS": True, "OPTIONS": {"TRANSACTION_POOLING": True}}
    assert parse_pool_settings("default", base).transaction_pooling is True
    assert parse_pool_settings("default", {"OPTIONS": {}}).transaction_pooling is False

    with pytest.raises(ImproperlyConfigured, match="DISABLE_SERVER_SIDE_CURSORS"):
        parse_pool_settings("default", {"OPTIONS": {"TRANSACTION_POOLING": True}})
    with pytest.raises(ImproperlyConfigured, match="assume_role"):
        parse_pool_settings(
            "default", {**base, "OPTIONS": {"TRANSACTION_POOLING": True, "assume_role": "app"}}
        )
    with pytest.raises(ImproperlyConfigured, match="TRANSACTION_POOLING"):
        parse_pool_settings("default", {"OPTIONS": {"TRANSACTION_POOLING": "yes"}})
    # Those that may work are system checks (W005, W006: tests/test_checks.py), not refused.
    parse_pool_settings(
        "default",
        {
            **base,
            "OPTIONS": {
                "TRANSACTION_POOLING": True,
                "prepare_threshold": 5,
                "RESET_QUERY": "DISCARD ALL",
            },
        },
    )


def test_pool_option_is_not_passed_to_the_driver(pgbouncer):
    params = connection.get_connection_params()
    assert "TRANSACTION_POOLING" not in params
    assert connection.settings_dict["OPTIONS"]["TRANSACTION_POOLING"] is True


def test_pgbouncer_restart_under_load(pgbouncer, configure_pool):
    configure_pool(MAX_CONNS=4, POOL_TIMEOUT=15, CONNECT_RETRIES=2, CONNECT_RETRY_DELAY=0.05)
    with Load(concurrency=8) as load:
        load.wait_for_requests(100)
        pgbouncer.stop()
        gevent.sleep(0.3)
        pgbouncer.start()
        back = monotonic()
        load.wait_for_requests(300, since=back)
    logger.info("pgbouncer restart: errors during the outage: %s", load.error_summary())
    assert load.failures(since=back) == [], load.error_summary(since=back)
    stats = get_stats()
    assert stats["pool_size"] <= 4
    assert stats["requests_waiting"] == 0


def _wait_until_serving(timeout: float = 30.0) -> None:
    """Return once a new connection through pgbouncer runs a query."""
    deadline = monotonic() + timeout
    while True:
        probe = None
        try:
            probe = raw_connect()
            query(probe, "SELECT 1")
            return
        except Exception:
            # Refused at login, or at the first query (pgbouncer's choice).
            if monotonic() > deadline:
                raise
            gevent.sleep(0.05)
        finally:
            if probe is not None:
                probe.close()


def test_postgresql_restart_behind_pgbouncer(cluster, fresh_pool, configure_pool):
    """With pgbouncer's server_login_retry lowered to 1 s (default 15 s), as documented.

    With the default, pgbouncer refuses every client login for 15 s after one
    failed server login ("server login has been failing, try again later"),
    which no client-side retry can bridge.
    """
    bouncer = PgBouncer(
        cluster.host,
        cluster.port,
        users={cluster.superuser: cluster.password},
        settings={"server_login_retry": "1"},
    )
    bouncer.start()
    _route_default_alias_through(bouncer)
    try:
        configure_pool(MAX_CONNS=4, POOL_TIMEOUT=15, CONNECT_RETRIES=2, CONNECT_RETRY_DELAY=0.05)
        with Load(concurrency=8) as load:
            load.wait_for_requests(100)
            cluster.restart()
            # pgbouncer may still refuse logins for up to server_login_retry
            # after the server is back: "back" is when it serves one again.
            _wait_until_serving()
            back = monotonic()
            load.wait_for_requests(300, since=back)
        logger.info("PostgreSQL restart behind pgbouncer: errors: %s", load.error_summary())
        assert load.failures(since=back) == [], load.error_summary(since=back)
    finally:
        connections["default"].close()
        connections["default"].close_pool()
        bouncer.destroy()
