"""The one table the benchmark queries; the worker creates it (no migrations)."""

from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=100)

    class Meta:
        app_label = "benchapp"
        db_table = "bench_item"
        managed = False
