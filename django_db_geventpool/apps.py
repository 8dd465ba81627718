"""Optional app entry: ``INSTALLED_APPS += ["django_db_geventpool"]``.

Not needed when the default alias uses a django_db_geventpool ENGINE (the ENGINE
module registers the system checks when Django imports it). Add it if only other aliases
are pooled, so that ``manage.py check`` still runs the pool's checks.
"""

from django.apps import AppConfig


class GeventPoolConfig(AppConfig):
    name = "django_db_geventpool"
    verbose_name = "django-db-geventpool"

    def ready(self) -> None:
        from .checks import register

        register()
