"""Settings shared by every test configuration.

The suite's conftest starts a throwaway PostgreSQL and exports where it listens
(``GEVENTPOOL_TEST_*``) before Django reads these settings.
"""

import os

SECRET_KEY = "tests-only"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "tests.testapp"]

TEST_APPLICATION_NAME = "geventpool-test"


def database(engine: str) -> dict:
    return {
        "ENGINE": engine,
        "NAME": os.environ.get("GEVENTPOOL_TEST_DBNAME", "geventpool_test"),
        "USER": os.environ.get("GEVENTPOOL_TEST_USER", "postgres"),
        "PASSWORD": os.environ.get("GEVENTPOOL_TEST_PASSWORD", "postgres"),
        "HOST": os.environ.get("GEVENTPOOL_TEST_HOST", ""),
        "PORT": os.environ.get("GEVENTPOOL_TEST_PORT", ""),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"MAX_CONNS": 4, "application_name": TEST_APPLICATION_NAME},
    }
