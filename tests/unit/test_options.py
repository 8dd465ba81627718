"""Pool options: each bad value rejected with a message naming alias and option (no server)."""

from __future__ import annotations

import re

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_db_geventpool.backends.options import POOL_OPTION_NAMES, parse_pool_settings

BAD_VALUES = [
    # option, value, what the message must mention
    ("MAX_CONNS", 0, "integer >= 1"),
    ("MAX_CONNS", -3, "integer >= 1"),
    ("MAX_CONNS", 2.5, "integer >= 1"),
    ("MAX_CONNS", "10", "integer >= 1"),
    ("MAX_CONNS", True, "integer >= 1"),
    ("MAX_CONNS", None, "integer >= 1"),
    ("REUSE_CONNS", -1, "integer >= 0"),
    ("REUSE_CONNS", "2", "integer >= 0"),
    ("REUSE_CONNS", False, "integer >= 0"),
    ("REUSE_CONNS", 1.0, "integer >= 0"),
    ("POOL_TIMEOUT", 0, "> 0"),
    ("POOL_TIMEOUT", -1.5, "> 0"),
    ("POOL_TIMEOUT", "5", "> 0"),
    ("POOL_TIMEOUT", True, "> 0"),
    ("POOL_TIMEOUT", None, "> 0"),
    ("HEALTH_CHECK_DELAY", -0.1, ">= 0"),
    ("HEALTH_CHECK_DELAY", "1", ">= 0"),
    ("HEALTH_CHECK_DELAY", True, ">= 0"),
    ("MAX_LIFETIME", 0, "> 0"),
    ("MAX_LIFETIME", "3600", "> 0"),
    ("MAX_LIFETIME", False, "> 0"),
    ("MAX_IDLE", 0, "> 0"),
    ("MAX_IDLE", [600], "> 0"),
    ("MAX_IDLE", True, "> 0"),
    ("LEAK_TIMEOUT", 0, "> 0"),
    ("LEAK_TIMEOUT", "30", "> 0"),
    ("LEAK_TIMEOUT", True, "> 0"),
    ("CONNECT_RETRIES", -1, "integer >= 0"),
    ("CONNECT_RETRIES", 1.5, "integer >= 0"),
    ("CONNECT_RETRIES", True, "integer >= 0"),
    ("CONNECT_RETRIES", None, "integer >= 0"),
    ("CONNECT_RETRY_DELAY", -0.1, ">= 0"),
    ("CONNECT_RETRY_DELAY", "0.1", ">= 0"),
    ("CONNECT_RETRY_DELAY", True, ">= 0"),
    ("CONNECT_RETRY_DELAY", None, ">= 0"),
    ("RESET_QUERY", "", "SQL string"),
    ("RESET_QUERY", "   ", "SQL string"),
    ("RESET_QUERY", 1, "SQL string"),
    ("RESET_QUERY", True, "SQL string"),
    ("PEERS", "replica", "list of other DATABASES aliases"),
    ("PEERS", ["replica", 3], "list of other DATABASES aliases"),
    ("PEERS", [""], "list of other DATABASES aliases"),
    ("CHECK_INTERVAL", 0, "> 0"),
    ("CHECK_INTERVAL", "30", "> 0"),
    ("CHECK_INTERVAL", True, "> 0"),
    ("CHECK_INTERVAL", None, "> 0"),
    ("STATS_LOG_INTERVAL", 0, "> 0"),
    ("STATS_LOG_INTERVAL", "60", "> 0"),
    ("STATS_LOG_INTERVAL", True, "> 0"),
    ("TRANSACTION_POOLING", 1, "True"),
    ("TRANSACTION_POOLING", "yes", "True"),
    ("TRANSACTION_POOLING", None, "True"),
    ("MIN_CONNS", -1, "integer >= 0"),
    ("MIN_CONNS", 1.5, "integer >= 0"),
    ("MIN_CONNS", True, "integer >= 0"),
    ("MIN_CONNS", None, "integer >= 0"),
    ("KEEPALIVE_INTERVAL", 0, "> 0"),
    ("KEEPALIVE_INTERVAL", "30", "> 0"),
    ("KEEPALIVE_INTERVAL", True, "> 0"),
    ("POOL_MODE", "Transaction", '"session" or "transaction"'),
    ("POOL_MODE", "statement", '"session" or "transaction"'),
    ("POOL_MODE", None, '"session" or "transaction"'),
    ("POOL_MODE", True, '"session" or "transaction"'),
]


def _settings(**options) -> dict:
    return {"NAME": "db", "OPTIONS": options}


@pytest.mark.parametrize("option, value, accepted", BAD_VALUES)
def test_bad_value_is_rejected_naming_alias_and_option(option, value, accepted):
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_pool_settings("reporting", _settings(**{option: value}))
    message = str(excinfo.value)
    assert "DATABASES['reporting']" in message
    assert repr(option) in message
    assert accepted in message
    assert repr(value) in message


def test_every_option_has_a_bad_value_case():
    # A new option needs its bad values listed above.
    assert {option for option, _, _ in BAD_VALUES} == set(POOL_OPTION_NAMES)


def test_good_values_are_accepted():
    settings = parse_pool_settings(
        "default",
        _settings(
            MAX_CONNS=8,
            REUSE_CONNS=0,
            POOL_TIMEOUT=1,
            HEALTH_CHECK_DELAY=0,
            MAX_LIFETIME=None,
            MAX_IDLE=None,
            LEAK_TIMEOUT=2.5,
            CONNECT_RETRIES=0,
            CONNECT_RETRY_DELAY=0,
            RESET_QUERY="DISCARD ALL",
            PEERS=["replica"],
            CHECK_INTERVAL=5,
        ),
    )
    assert settings.max_conns == 8
    assert settings.reuse_conns == 0
    assert settings.health_check_delay == 0
    assert settings.pool_timeout == 1.0
    assert settings.peers == ("replica",)


def test_pool_mode_values_and_default():
    assert parse_pool_settings("default", _settings()).pool_mode == "session"
    for mode in ("session", "transaction"):
        assert parse_pool_settings("default", _settings(POOL_MODE=mode)).pool_mode == mode


def test_transaction_mode_refuses_autocommit_off():
    settings_dict = {**_settings(POOL_MODE="transaction"), "AUTOCOMMIT": False}
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_pool_settings("reporting", settings_dict)
    message = str(excinfo.value)
    assert "DATABASES['reporting']" in message and "'POOL_MODE'" in message
    assert "AUTOCOMMIT" in message
    # Session mode keeps accepting it.
    parse_pool_settings("reporting", {**_settings(POOL_MODE="session"), "AUTOCOMMIT": False})


def test_transaction_mode_combines_with_transaction_pooling():
    # pgbouncer's rules still apply: server-side cursors stay refused behind it.
    both = _settings(POOL_MODE="transaction", TRANSACTION_POOLING=True)
    with pytest.raises(ImproperlyConfigured, match="DISABLE_SERVER_SIDE_CURSORS"):
        parse_pool_settings("default", both)
    settings = parse_pool_settings("default", {**both, "DISABLE_SERVER_SIDE_CURSORS": True})
    assert settings.pool_mode == "transaction" and settings.transaction_pooling


def test_defaults_follow_the_design():
    settings = parse_pool_settings("default", _settings())
    assert settings.max_conns == 4
    assert settings.reuse_conns == 4
    assert settings.pool_timeout == 30.0
    assert settings.health_check_delay == 1.0
    assert settings.max_lifetime == 3600.0
    assert settings.max_idle == 600.0
    assert settings.leak_timeout is None
    assert settings.connect_retries == 1
    assert settings.connect_retry_delay == 0.1
    assert settings.reset_query is None
    assert settings.peers == ()
    assert settings.check_interval == 30.0


def test_reuse_conns_above_max_conns_is_rejected():
    with pytest.raises(
        ImproperlyConfigured, match=r"\['REUSE_CONNS'\] must be at most MAX_CONNS \(2\)"
    ):
        parse_pool_settings("default", _settings(MAX_CONNS=2, REUSE_CONNS=3))


def test_unknown_upper_case_option_gets_a_suggestion():
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_pool_settings("default", _settings(MAX_CONN=10))
    message = str(excinfo.value)
    assert "DATABASES['default']" in message
    assert "['MAX_CONN'] is not a django_db_geventpool option" in message
    assert "did you mean 'MAX_CONNS'?" in message


def test_djangos_own_pool_option_is_refused():
    with pytest.raises(ImproperlyConfigured) as excinfo:
        parse_pool_settings("default", _settings(pool={"min_size": 2}))
    message = str(excinfo.value)
    assert "DATABASES['default']['OPTIONS']['pool']" in message
    assert "MAX_CONNS" in message


def test_top_level_peers_are_validated_too():
    with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['default'\]\['PEERS'\]"):
        parse_pool_settings("default", {"NAME": "db", "OPTIONS": {}, "PEERS": "replica"})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"MAX_CONNS": 4, "MIN_CONNS": 5}, "'MIN_CONNS'] must be at most MAX_CONNS (4); got 5"),
        ({"MAX_CONNS": 4, "REUSE_CONNS": 2, "MIN_CONNS": 3}, "at most REUSE_CONNS (2)"),
        ({"MAX_IDLE": 60, "KEEPALIVE_INTERVAL": 60}, "must be shorter than MAX_IDLE"),
    ],
)
def test_min_conns_and_keepalive_are_checked_against_the_other_options(options, message):
    with pytest.raises(ImproperlyConfigured, match=re.escape(message)):
        parse_pool_settings("default", _settings(**options))


def test_min_conns_and_keepalive_reach_the_pool():
    settings = parse_pool_settings(
        "default", _settings(MAX_CONNS=6, MIN_CONNS=2, KEEPALIVE_INTERVAL=45)
    )
    assert settings.pool_kwargs()["min_size"] == 2
    assert settings.pool_kwargs()["keepalive_interval"] == 45.0
    defaults = parse_pool_settings("default", _settings())
    assert defaults.min_conns == 0
    assert defaults.keepalive_interval is None
