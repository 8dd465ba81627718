"""Celery tasks that use the ORM; none of them gives its connection back by hand."""

import asyncio
import os

from celery import shared_task
from django.db import transaction
from django.db.models import F

from .external import call_another_service


@shared_task
def sell(product_id: int) -> int:
    """Count one sale of a product; return its new total (each sale sees its own)."""
    from .models import Product

    with transaction.atomic():
        product = Product.objects.select_for_update().get(pk=product_id)
        product.sold = F("sold") + 1
        product.save(update_fields=["sold"])
        product.refresh_from_db(fields=["sold"])
    return product.sold


@shared_task
def count_with_wait(seconds: float) -> dict:
    """One query, a wait standing for a call to another service, one more query.

    Returns the product count and how many tasks of this worker were inside the
    wait at once so far (with ``POOL_MODE=transaction``, more than ``MAX_CONNS``).
    """
    from .models import Product

    first = Product.objects.count()
    waiting_peak = call_another_service(seconds)
    return {"products": first, "again": Product.objects.count(), "waiting_peak": waiting_peak}


@shared_task
def fail_after_query(product_id: int) -> None:
    """Use the ORM, then fail: the connection must go back all the same."""
    from .models import Product

    Product.objects.filter(pk=product_id).exists()
    raise ValueError("the task failed on purpose")


@shared_task(bind=True, max_retries=1)
def retry_once_after_query(self, product_id: int) -> int:
    """Use the ORM, then ask to be retried once; the retry returns its attempt number."""
    from .models import Product

    Product.objects.filter(pk=product_id).exists()
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return self.request.retries


@shared_task
def pool_stats() -> dict:
    """The worker's pool stats (this task's own connection is not counted: it has none)."""
    from django_db_geventpool import get_stats

    return {"pid": os.getpid(), **get_stats()}


# The state the asyncio tasks report while their loop runs, so a caller can start
# other work during it (the tests check that the two overlapped).
LOOP_RUNNING = "LOOP_RUNNING"


async def _sleep_reporting(task, seconds: float) -> None:
    task.update_state(state=LOOP_RUNNING)
    await asyncio.sleep(seconds)


@shared_task(bind=True)
def sleep_in_asyncio(self, seconds: float) -> None:
    """Run an asyncio event loop in the task's greenlet: the cause of SynchronousOnlyOperation.

    While this loop waits, every other greenlet of the worker sees a running event
    loop (they share the OS thread), and Django refuses their ORM calls. See
    docs/celery.md for the fix (`run_in_native_thread`).
    """
    asyncio.run(_sleep_reporting(self, seconds))


@shared_task(bind=True)
def sleep_in_asyncio_native_thread(self, seconds: float) -> None:
    """The same asyncio code, run in a real OS thread: other greenlets are unaffected."""
    from django_db_geventpool.utils import run_in_native_thread

    # Reported from the task's greenlet (celery's client is not for another OS thread);
    # the thread's loop starts right after.
    self.update_state(state=LOOP_RUNNING)
    run_in_native_thread(asyncio.run, asyncio.sleep(seconds))
