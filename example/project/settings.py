"""Settings of the example project; the database comes from the environment.

libpq's own variables name the server (``PGHOST``, ``PGPORT``, ``PGDATABASE``,
``PGUSER``, ``PGPASSWORD``); ``MAX_CONNS``, ``POOL_TIMEOUT`` and
``STATS_LOG_INTERVAL`` size and watch the pool, ``POOL_MODE`` says when a request
gives its connection back (``session`` or ``transaction``); ``DB_ENGINE`` picks the backend
(default: psycopg 3 when it is installed, else psycopg2).
"""

import importlib.util
import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
# The example only listens on loopback; list your real host names instead.
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
# django_db_geventpool: for `manage.py geventpool drain|resize|stats`.
INSTALLED_APPS = ["django_db_geventpool", "shop"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def _default_engine() -> str:
    driver = "psycopg3" if importlib.util.find_spec("psycopg") else "psycopg2"
    return f"django_db_geventpool.backends.postgresql_{driver}"


def _optional_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


DATABASES = {
    "default": {
        "ENGINE": os.environ.get("DB_ENGINE") or _default_engine(),
        "NAME": os.environ.get("PGDATABASE", "example"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            "MAX_CONNS": int(os.environ.get("MAX_CONNS", "5")),
            "POOL_TIMEOUT": float(os.environ.get("POOL_TIMEOUT", "10")),
            "STATS_LOG_INTERVAL": _optional_float("STATS_LOG_INTERVAL"),
            "MIN_CONNS": int(os.environ.get("MIN_CONNS", "0")),
            "POOL_MODE": os.environ.get("POOL_MODE", "session"),
            "application_name": os.environ.get("DB_APPLICATION_NAME", "geventpool-example"),
        },
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"}
    },
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "django_db_geventpool": {
            "handlers": ["stderr"],
            "level": os.environ.get("POOL_LOG_LEVEL", "INFO"),
        },
    },
}

# Celery (project/celery.py): a Redis broker, results in Redis too.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", CELERY_BROKER_URL)
CELERY_TASK_ACKS_LATE = False
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's own Django fixup closes connections after every task unless this is set;
# django_db_geventpool.celery.install() gives them back to the pool either way
# (the celery test sets it, so that the integration is the only thing at work).
if os.environ.get("CELERY_DB_REUSE_MAX"):
    CELERY_DB_REUSE_MAX = int(os.environ["CELERY_DB_REUSE_MAX"])
