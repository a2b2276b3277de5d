import signal
import sys

from django.core.management.base import BaseCommand, CommandError

from migrations_app import migration
from migrations_app.models import MigrationJob


class Command(BaseCommand):
    help = (
        "Follow a job's helper and keep the job's record up to date until the helper finishes "
        "or stops this app. migrate_app starts it in the background; run it to re-attach."
    )

    def add_arguments(self, parser):
        parser.add_argument("job_id", type=int)

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

        outcome = migration.Follower(job, show, until_stop=True).run()
        self.stdout.write(f"job {job.pk}: {outcome}")
