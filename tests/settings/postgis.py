"""PostGIS, with whichever driver the environment has (Django picks it)."""

from .base import *  # noqa: F403
from .base import INSTALLED_APPS, database

INSTALLED_APPS = [*INSTALLED_APPS, "django.contrib.gis", "tests.gisapp"]
DATABASES = {"default": database("django_db_geventpool.backends.postgis")}
