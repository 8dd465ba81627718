"""A view that queries the database on every request."""

import os

from django.db.models import Count, Sum
from django.http import JsonResponse


def product_summary(request):
    """How many products, and their total price; answered by one query."""
    from .models import Product

    summary = Product.objects.aggregate(products=Count("id"), total_cents=Sum("price_cents"))
    return JsonResponse({**summary, "pid": os.getpid()})
