import os
import sys

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from migrations_app import migration

from .startup import Command as Startup


class Command(BaseCommand):
    help = (
        "MIG's component command: run `startup` (finishing any job that travelled with the app), "
        "then serve the web interface with gunicorn (conf/gunicorn.conf.py)."
    )

    def handle(self, *args, **options):
        startup = Startup(stdout=self.stdout, stderr=self.stderr)
        call_command(startup)
        if startup.following:
            migration.start_follower(startup.following)
        self.stdout.flush()
        conf = str(settings.BASE_DIR / "conf" / "gunicorn.conf.py")
        os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", conf, "migsite.wsgi"])
