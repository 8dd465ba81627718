from django.db import models


class Product(models.Model):
    """Something to query."""

    name = models.CharField(max_length=100)
    price_cents = models.IntegerField(default=0)
    sold = models.IntegerField(default=0)

    def __str__(self) -> str:
        return self.name
