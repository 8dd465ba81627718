"""Views that query the database on every request."""

import os

from django.db.models import Count, Sum
from django.http import JsonResponse

from .external import call_another_service


def product_summary(request):
    """How many products, and their total price; answered by one query."""
    from .models import Product

    summary = Product.objects.aggregate(products=Count("id"), total_cents=Sum("price_cents"))
    return JsonResponse({**summary, "pid": os.getpid()})


def summary_with_wait(request):
    """One query, a wait standing for a call to another service, one more query.

    ``?wait_ms=`` sets the wait (``time.sleep``, which gevent makes cooperative).
    With ``POOL_MODE=transaction`` no connection is held during the wait, so more
    requests than ``MAX_CONNS`` can be in it at once; ``waiting_peak`` says how
    many were, in this process.
    """
    from .models import Product

    seconds = float(request.GET.get("wait_ms", "20")) / 1000
    products = Product.objects.count()
    waiting_peak = call_another_service(seconds)
    total = Product.objects.aggregate(total_cents=Sum("price_cents"))["total_cents"]
    return JsonResponse(
        {
            "products": products,
            "total_cents": total,
            "waiting_peak": waiting_peak,
            "pid": os.getpid(),
        }
    )
