"""Celery integration: every task gives its connections back to the pool when it ends.

Add one call to your celery app module (for example ``project/celery.py``)::

    import django_db_geventpool.celery

    app = Celery("project")
    ...
    django_db_geventpool.celery.install()

Then tasks need no ``@close_connection``: when a task ends (success, failure or
retry), celery sends ``task_postrun`` in the task's own greenlet, and every
connection that greenlet holds goes back to its pool (connections of other
backends are treated as at the end of a request, ``CONN_MAX_AGE`` included).
Tasks run eagerly (``task_always_eager``, ``.apply()``) are left alone: they run
inside their caller, whose connection, and transaction, must survive them.

Celery's own Django fixup also closes connections after each task, unless
``CELERY_DB_REUSE_MAX`` is set or the fixup is not active (the app was created
before ``DJANGO_SETTINGS_MODULE`` was set, or with a custom loader);
`install` makes the pool independent of both.

``SynchronousOnlyOperation`` under ``--pool gevent`` is not caused by the pool: it
happens when some greenlet runs an asyncio event loop (see
`django_db_geventpool.utils.run_in_native_thread`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from .utils import give_back_connections

__all__ = ["install", "uninstall"]

logger = logging.getLogger(__name__)

_DISPATCH_UID = "django_db_geventpool.celery.give_back_after_task"


def _give_back_after_task(sender: Any = None, **kwargs: Any) -> None:
    task = kwargs.get("task", sender)
    request = getattr(task, "request", None)
    if getattr(request, "is_eager", False):
        return
    give_back_connections()


def install() -> None:
    """Give connections back at the end of every (non-eager) task. Idempotent."""
    signals.task_postrun.connect(_give_back_after_task, dispatch_uid=_DISPATCH_UID, weak=False)
    logger.debug("celery tasks give their connections back at task_postrun")


def uninstall() -> None:
    """Undo `install`."""
    signals.task_postrun.disconnect(_give_back_after_task, dispatch_uid=_DISPATCH_UID)
