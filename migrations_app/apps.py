from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    name = "migrations_app"
    verbose_name = "MIG"

    def ready(self):
        from . import signals  # noqa: F401 - connects the receivers
