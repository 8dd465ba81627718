"""The example's celery app: run ``celery -A project worker --pool gevent`` from example/.

The one line that matters for the pool is ``django_db_geventpool.celery.install()``:
each task gives its connections back to the pool when it ends, so tasks need no
``@close_connection``.
"""

import os

from celery import Celery

import django_db_geventpool.celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
django_db_geventpool.celery.install()
