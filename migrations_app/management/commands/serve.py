import os
import signal
import sys
import time

from django import db
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from gunicorn.app.base import Application
from gunicorn.arbiter import Arbiter

from migrations_app import migration

from .startup import Command as Startup


class MigServer(Application):
    """gunicorn in this very process: Django is loaded once, before the workers fork."""

    def load_config(self):
        self.load_config_from_file(str(settings.BASE_DIR / "conf" / "gunicorn.conf.py"))
        if settings.MIG_NO_LOGIN:
            # Without a login, only this host may reach MIG: the port stays, the address
            # becomes loopback, whatever MIG_BIND or the app's URL said (a unix socket is
            # local already).
            self.cfg.set("bind", [loopback(address) for address in self.cfg.bind])

    def load(self):
        from migsite.wsgi import application

        return application

    def run(self):
        # gunicorn's Application.run adds only what MIG's config never asks for (printing
        # or checking the config, daemon mode, extra paths) before running its Arbiter.
        MigArbiter(self).run()


class MigArbiter(Arbiter):
    def stop(self, graceful=True):
        """Look for the workers' end every 10 ms for 0.1 s, then let gunicorn's stop go on.

        gunicorn's stop looks every 0.1 s, and sleeps after each look: workers that end in
        5 ms (idle, or done with their requests) kept the master 0.2 s, and a stopping app
        is down meanwhile. Its stop then has none left to wait for, or waits for the rest
        as before (its graceful timeout, from then on).
        """
        self.kill_workers(signal.SIGTERM if graceful else signal.SIGQUIT)
        until = time.monotonic() + 0.1
        while self.WORKERS and time.monotonic() < until:
            time.sleep(0.01)
            self.reap_workers()
        super().stop(graceful)


def loopback(address):
    return address if address.startswith("unix:") else f"127.0.0.1:{address.rpartition(':')[2]}"


class Command(BaseCommand):
    help = (
        "MIG's component command: prepare the config volume, database and grids, serve the web "
        "interface (gunicorn, conf/gunicorn.conf.py), and meanwhile run the rest of `startup` "
        "(the login's password, and finishing any job that travelled with the app) in the background."
    )

    # Django's checks are run by the `startup` this starts in the background, as gunicorn
    # serving Django runs none: the app is down until it answers.
    requires_system_checks = []

    def handle(self, *args, **options):
        since = time.time()
        # Only what answering needs happens before serving: the app is down until it answers,
        # so a migrated app's downtime ends here, not after the remote clean-up.
        self.step_prepare()
        # A grid it cannot reach now, it tries again while MIG runs, not only at the next start.
        # MIG answers before this is done: jobs started meanwhile are not left-overs. It
        # yields the CPU to the web workers starting beside it, whose first answer ends a
        # migrated app's downtime (its imports took 0.14-0.22 CPU-seconds of the 0.4 s after
        # the bench's final pass).
        migration.spawn_manage(
            "startup", "--keep-trying", "--mig-since", repr(since), log=False, yielding=True
        )
        db.connections.close_all()
        self.stdout.flush()
        self.step_serve()

    def step_prepare(self):
        """Startup's preparation, with grid.info's grids: the form lists them from MIG's first
        answer (the background startup got to them only after the first page had shown none).
        A grid.info that cannot be read leaves MIG answering, saying why, without grids."""
        startup = Startup(stdout=self.stdout, stderr=self.stderr)
        try:
            grids = startup.read_grid_info()
        except CommandError as e:
            startup.warn(f"{e}; MIG answers without its grids")
            grids = None
        startup.prepare(grids)

    def step_serve(self):
        try:
            MigServer().run()
        except SystemExit as stop:
            # gunicorn has stopped its workers and said so. Leave now, with its status: an
            # interpreter teardown would only add to the time a stopping app is down (see
            # worker_exit in conf/gunicorn.conf.py).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1)
