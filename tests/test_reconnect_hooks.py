"""Reconnect hooks and signals, connect retries, and a password rotated under load.

A second PostgreSQL cluster with ``scram-sha-256`` authentication serves the
``rotating`` alias, logging in as a role whose password a stand-in secrets store
(Vault, say) rotates: ``ALTER ROLE ... PASSWORD``, then the role's sessions are
terminated. A pre-reconnect hook copies the current password from the store into
``dbwrapper.settings_dict``; no request that starts after the rotation fails.
"""

import copy
import itertools
import logging
from time import monotonic

import gevent
import gevent.event
import pytest
from django.db import OperationalError, connections

from django_db_geventpool import PoolTimeout, get_stats, signals
from tests.support.eventually import wait_until
from tests.support.helpers import backend_pid
from tests.support.load import Load
from tests.support.pgserver import PostgresCluster

logger = logging.getLogger(__name__)

ALIAS = "rotating"
ROLE = "rotapp"
DBNAME = "rotdb"
APPLICATION_NAME = "geventpool-rotation"


class SecretsStore:
    """A stand-in for Vault: the current password of each role, and who asked."""

    def __init__(self, passwords: dict[str, str]) -> None:
        self._passwords = dict(passwords)
        self.reads = 0

    def read(self, role: str) -> str:
        self.reads += 1
        return self._passwords[role]

    def write(self, role: str, password: str) -> None:
        self._passwords[role] = password


@pytest.fixture(scope="module")
def scram_cluster():
    server = PostgresCluster(auth="scram-sha-256")
    server.start()
    server.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD 'first-secret'")
    server.psql(f"CREATE DATABASE {DBNAME} OWNER {ROLE}")
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def rotating(scram_cluster, fresh_pool):
    """The ``rotating`` alias (added to DATABASES for this test) and its cluster."""
    scram_cluster.psql(f"ALTER ROLE {ROLE} PASSWORD 'first-secret'")
    entry = copy.deepcopy(connections.settings["default"])
    entry.update(
        NAME=DBNAME,
        USER=ROLE,
        PASSWORD="first-secret",
        HOST=scram_cluster.host,
        PORT=str(scram_cluster.port),
        OPTIONS={"MAX_CONNS": 4, "application_name": APPLICATION_NAME},
    )
    connections.settings[ALIAS] = entry
    try:
        yield scram_cluster
    finally:
        connections[ALIAS].close()
        connections[ALIAS].close_pool()
        del connections[ALIAS]
        del connections.settings[ALIAS]


@pytest.fixture
def hooks():
    """Add reconnect hooks for one test: ``hooks.pre(fn)``, ``hooks.post(fn)``."""
    added = []

    class Hooks:
        @staticmethod
        def pre(hook):
            signals.add_pre_reconnect_hook(hook)
            added.append(hook)

        @staticmethod
        def post(hook):
            signals.add_post_reconnect_hook(hook)
            added.append(hook)

    yield Hooks
    for hook in added:
        signals.remove_reconnect_hook(hook)


def _configure(**options) -> None:
    connections[ALIAS].close()
    connections[ALIAS].close_pool()
    connections.settings[ALIAS]["OPTIONS"].update(options)


def _checks_out(alias: str) -> bool:
    try:
        backend_pid(alias)
    except PoolTimeout:
        return False
    return True


def _sessions(server: PostgresCluster) -> set[int]:
    out = server.psql(f"SELECT pid FROM pg_stat_activity WHERE usename = '{ROLE}'")
    return {int(line) for line in out.split()}


def _terminate_sessions(server: PostgresCluster) -> None:
    """Terminate the role's sessions and wait until each backend has exited."""
    server.psql(
        f"SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = '{ROLE}'"
    )


def _warm_up(count: int) -> list[int]:
    """Check out ``count`` connections at once and give them back; their pids.

    Each holds its connection until all have one (a barrier, not a timed hold: on a
    loaded machine one connect can outlast another request's hold, and that
    request's connection would then serve the late one).
    """
    pids = []
    all_in = gevent.event.Event()

    def hold():
        try:
            pids.append(backend_pid(ALIAS))
            if len(pids) == count:
                all_in.set()
            assert all_in.wait(30), "the connections were never all held at once"
        finally:
            connections[ALIAS].close()

    gevent.joinall([gevent.spawn(hold) for _ in range(count)], raise_error=True)
    return pids


def test_password_rotated_under_load_fails_no_later_request(rotating, hooks, caplog):
    server = rotating
    # Everything the package logs, down to DEBUG: no password may appear in it.
    caplog.set_level(logging.DEBUG, logger="django_db_geventpool")
    store = SecretsStore({ROLE: "first-secret"})

    def fetch_password(dbwrapper):
        if dbwrapper.alias == ALIAS:
            dbwrapper.settings_dict["PASSWORD"] = store.read(ROLE)

    hooks.pre(fetch_password)
    _configure(MAX_CONNS=4, CONNECT_RETRIES=3, CONNECT_RETRY_DELAY=0.05)
    with Load(alias=ALIAS, concurrency=8) as load:
        load.wait_for_requests(100)
        old_sessions = _sessions(server)
        # What Vault does on rotation: new password in the database and in the
        # store, then the sessions of the old credentials are ended.
        server.psql(f"ALTER ROLE {ROLE} PASSWORD 'second-secret'")
        store.write(ROLE, "second-secret")
        _terminate_sessions(server)
        rotated = monotonic()
        load.wait_for_requests(300, since=rotated)
    logger.info("rotation: errors of requests in flight at the rotation: %s", load.error_summary())
    assert load.failures(since=rotated) == [], load.error_summary(since=rotated)
    assert old_sessions
    assert not old_sessions & _sessions(server)
    assert store.reads >= 1
    assert connections.settings[ALIAS]["PASSWORD"] == "second-secret"
    stats = get_stats(ALIAS)
    assert stats["connections_lost"] >= 1
    assert stats["pool_size"] <= 4
    _assert_no_password_logged(caplog, ["first-secret", "second-secret"])


def _assert_no_password_logged(caplog, passwords: list[str]) -> None:
    """No record of the package, formatted with its traceback, holds a password."""
    records = [r for r in caplog.records if r.name.startswith("django_db_geventpool")]
    messages = [r.getMessage() for r in records]
    # Not vacuous: connects, lost connections and checkouts were logged.
    assert any("opened connection" in m for m in messages)
    assert any("discarding broken connection" in m for m in messages)
    formatter = logging.Formatter()
    for record in records:
        text = formatter.format(record)
        leaked = [p for p in passwords if p in text]
        assert not leaked, f"password in a log record of {record.name}: {text}"


def test_failing_hook_reaches_the_caller_and_the_pool_keeps_its_slots(rotating, hooks):
    _configure(MAX_CONNS=2, CONNECT_RETRIES=1, CONNECT_RETRY_DELAY=0.01)
    _warm_up(2)
    assert get_stats(ALIAS)["pool_size"] == 2

    def sealed_store(dbwrapper):
        raise RuntimeError("secrets store is sealed")

    hooks.pre(sealed_store)
    _terminate_sessions(rotating)
    with pytest.raises(RuntimeError, match="secrets store is sealed") as raised:
        backend_pid(ALIAS)
    assert any("pre_reconnect" in note and ALIAS in note for note in raised.value.__notes__)
    connections[ALIAS].close()
    stats = get_stats(ALIAS)
    assert stats["pool_size"] == 0  # the two broken connections were closed, no slot kept
    assert stats["requests_waiting"] == 0
    assert stats["requests_errors"] == 1

    signals.remove_reconnect_hook(sealed_store)
    pids = _warm_up(2)  # both slots usable at once again
    assert len(set(pids)) == 2
    assert get_stats(ALIAS)["pool_size"] == 2


def test_signals_fire_with_sender_and_dbwrapper(rotating):
    _configure(MAX_CONNS=1)
    received = []

    def on_pre(sender, dbwrapper, **kwargs):
        received.append(("pre", sender, dbwrapper))

    def on_post(sender, dbwrapper, **kwargs):
        # After the connect: the new server connection is open.
        received.append(("post", sender, dbwrapper))

    signals.pre_reconnect.connect(on_pre)
    signals.post_reconnect.connect(on_post)
    try:
        first = backend_pid(ALIAS)
        connections[ALIAS].close()
        assert received == []  # a first connect is not a reconnect
        _terminate_sessions(rotating)
        second = backend_pid(ALIAS)
    finally:
        signals.pre_reconnect.disconnect(on_pre)
        signals.post_reconnect.disconnect(on_post)
    wrapper = connections[ALIAS]
    assert first != second
    # The pool opens connections in its own greenlets, each with a wrapper of the
    # alias over the alias's own settings_dict (a hook's change reaches every
    # later connect); pre and post get the same one.
    assert [(kind, sender) for kind, sender, _ in received] == [
        ("pre", type(wrapper)),
        ("post", type(wrapper)),
    ]
    (_, _, pre_wrapper), (_, _, post_wrapper) = received
    assert pre_wrapper is post_wrapper
    assert pre_wrapper.alias == ALIAS
    assert pre_wrapper.settings_dict is wrapper.settings_dict is connections.settings[ALIAS]
    assert get_stats(ALIAS)["connections_lost"] == 1


def test_post_reconnect_hook_runs_once_after_a_broken_connection_is_replaced(rotating, hooks):
    _configure(MAX_CONNS=1)
    calls = []

    def before(dbwrapper):
        calls.append(("pre hook", dbwrapper, get_stats(ALIAS)["connections_lost"]))

    def after(dbwrapper):
        calls.append(("post hook", dbwrapper, get_stats(ALIAS)["connections_lost"]))

    def on_post(sender, dbwrapper, **kwargs):
        calls.append(("post signal", dbwrapper, get_stats(ALIAS)["connections_lost"]))

    hooks.pre(before)
    hooks.post(after)
    signals.post_reconnect.connect(on_post)
    try:
        first = backend_pid(ALIAS)
        connections[ALIAS].close()
        assert calls == []  # a first connect is not a reconnect
        assert backend_pid(ALIAS) == first  # nor is a reuse
        connections[ALIAS].close()
        assert calls == []

        _terminate_sessions(rotating)
        second = backend_pid(ALIAS)
        connections[ALIAS].close()
        third = backend_pid(ALIAS)  # the replacement is reused: no reconnect
        connections[ALIAS].close()
    finally:
        signals.post_reconnect.disconnect(on_post)
    assert second != first and third == second
    # Once, with the connect's wrapper of the alias, after the broken connection
    # was found (lost) and the pre hook ran; the hook runs before the receivers.
    assert [(kind, lost) for kind, _, lost in calls] == [
        ("pre hook", 1),
        ("post hook", 1),
        ("post signal", 1),
    ]
    wrappers = {id(wrapper) for _, wrapper, _ in calls}
    assert len(wrappers) == 1
    assert calls[0][1].settings_dict is connections.settings[ALIAS]
    # The post hook ran on a successful connect: the replacement serves.
    stats = get_stats(ALIAS)
    assert stats["connections_num"] == 2
    assert stats["connections_errors"] == 0
    assert stats["pool_size"] == 1


def test_post_reconnect_hook_runs_only_when_a_retried_connect_succeeds(rotating, hooks):
    connections.settings[ALIAS]["PASSWORD"] = "stale-secret"
    _configure(MAX_CONNS=1, CONNECT_RETRIES=2, CONNECT_RETRY_DELAY=0.01)
    calls = []

    def fetch_password(dbwrapper):
        calls.append("pre")
        if calls.count("pre") == 2:
            dbwrapper.settings_dict["PASSWORD"] = "first-secret"

    hooks.pre(fetch_password)
    hooks.post(lambda dbwrapper: calls.append("post"))
    backend_pid(ALIAS)
    # Retry 1 fails (stale password), retry 2 connects: one post hook, after it.
    assert calls == ["pre", "pre", "post"]
    assert get_stats(ALIAS)["connections_errors"] == 2


def test_connect_retries_with_backoff_until_the_hook_finds_the_password(rotating, hooks, caplog):
    connections.settings[ALIAS]["PASSWORD"] = "stale-secret"
    delay = 0.1
    _configure(MAX_CONNS=1, CONNECT_RETRIES=3, CONNECT_RETRY_DELAY=delay)
    calls = []
    called_at: list[float] = []

    def fetch_password(dbwrapper):
        # Runs right before each retry's connect: the gaps between calls are the pauses.
        called_at.append(monotonic())
        calls.append(dbwrapper.settings_dict["PASSWORD"])
        if len(calls) == 3:  # the store has caught up at the third retry
            dbwrapper.settings_dict["PASSWORD"] = "first-secret"

    hooks.pre(fetch_password)
    caplog.set_level(logging.WARNING, logger="django_db_geventpool.pool")
    backend_pid(ALIAS)
    assert len(calls) == 3
    stats = get_stats(ALIAS)
    assert stats["connections_num"] == 4
    assert stats["connections_errors"] == 3
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert [r.args[2] for r in retries] == [1, 2, 3]
    # Doubled each time, with jitter between half and all of the delay: what was logged...
    for n, record in enumerate(retries):
        assert delay * 2**n * 0.5 <= record.args[4] <= delay * 2**n
    # ...and what was slept: the pause before retry n+1 is at least half of delay * 2**n
    # (a pause that does not double stays under delay and fails the second bound).
    gaps = [later - earlier for earlier, later in itertools.pairwise(called_at)]
    assert gaps[0] >= delay * 2 * 0.5, gaps
    assert gaps[1] >= delay * 4 * 0.5, gaps


def test_failing_connects_end_in_a_pool_timeout_that_names_the_drivers_error(rotating, hooks):
    connections.settings[ALIAS]["PASSWORD"] = "stale-secret"
    _configure(MAX_CONNS=1, CONNECT_RETRIES=2, CONNECT_RETRY_DELAY=0.01, POOL_TIMEOUT=1.0)
    calls = []
    hooks.pre(lambda dbwrapper: calls.append(dbwrapper.alias))
    started = monotonic()
    with pytest.raises(PoolTimeout, match="password authentication failed") as raised:
        backend_pid(ALIAS)
    # The checkout kept waiting (connects retried, backed off) for POOL_TIMEOUT,
    # then said why nothing came: the driver's error, chained.
    assert monotonic() - started >= 0.9
    assert isinstance(raised.value, OperationalError)
    assert "password authentication failed" in str(raised.value.__cause__)
    # Hooks ran before every retry: the first connect is not a reconnect.
    stats = get_stats(ALIAS)
    assert stats["connections_errors"] >= 3
    assert len(calls) == stats["connections_num"] - 1
    assert set(calls) == {ALIAS}
    wait_until(lambda: get_stats(ALIAS)["pool_size"] == 0)
    connections.settings[ALIAS]["PASSWORD"] = "first-secret"
    # The slot was given back: with MAX_CONNS=1 a lost slot would time out forever.
    # A checkout may still meet a backoff round begun with the stale password (the
    # pool probes within POOL_TIMEOUT / 2, but a loaded machine may miss one second),
    # so a later checkout counts too.
    wait_until(lambda: _checks_out(ALIAS), timeout=30)
