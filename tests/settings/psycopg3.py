from .base import *  # noqa: F403
from .base import database

DATABASES = {"default": database("django_db_geventpool.backends.postgresql_psycopg3")}
