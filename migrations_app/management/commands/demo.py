import os
import sys

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Serve MIG on its embedded defaults (the two-grid demo replaces this)."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1:8000", help="address:port to serve on")

    def handle(self, **options):
        call_command("startup")
        self.stdout.write(f"MIG at http://{options['bind']}/ (config volume {settings.CONFIG_DIR})")
        sys.stdout.flush()
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "conf/gunicorn.conf.py",
                "--bind",
                options["bind"],
                "migsite.wsgi",
            ],
        )
