import os
import signal
import sys

from django.core.management.base import BaseCommand, CommandError

from migrations_app import config, migration
from migrations_app.models import MigrationJob


class Command(BaseCommand):
    help = (
        "Run a job while MIG runs: provision its helper if that is still to do, then keep the job's "
        "record up to date from the helper's journal until the helper stops this app or finishes. "
        "The web form and migrate_app start it in the background, and startup again if only MIG "
        "restarted; one process runs a job at a time. Safe to run again to re-attach."
    )

    def add_arguments(self, parser):
        parser.add_argument("job_id", type=int, metavar="JOB")

    def handle(self, *args, **options):
        # SIGTERM arrives when the helper stops this app: leave at once, cleanly.
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        try:
            job = MigrationJob.objects.active().get(pk=options["job_id"])
        except MigrationJob.DoesNotExist:
            raise CommandError(f"no active job {options['job_id']}") from None

        def show(line):
            self.stdout.write(f"job {job.pk} [{line.get('phase')}] {line.get('message', '')}")
            self.stdout.flush()

        runner = migration.Runner(job, show, on_hands_off=silence)
        try:
            # Provisioning's connection to the target grid is the one the journal is followed on.
            with config.keeping_drivers():
                outcome = runner.run()
        except migration.RunnerBusy as e:
            raise CommandError(str(e)) from None
        if not runner.write_db:
            # The source's volumes are the final pass's now: not a byte more, not even a read
            # of the database (closing it would checkpoint it).
            return
        job.refresh_from_db()
        self.stdout.write(f"job {job.pk}: {outcome}" + (f" ({job.error})" if job.error else ""))


def silence():
    """From hands off on, this process's output goes nowhere: it is a log on the source's
    config volume, which the final pass copies and verify compares, and a library's stray
    warning must not change it."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
