from django.core.management.base import BaseCommand, CommandError

from migrations_app import migration
from migrations_app.grids import ConfigError, GridError
from migrations_app.models import MigrationJob


class Command(BaseCommand):
    help = (
        "Carry out what a job's cut-over decided, when no helper will any more (it died for good, "
        "or its grid lost it): after a commit, start the target app; after a rollback, or if nothing "
        "was decided (then it decides rollback), start the source app and remove the partial "
        "target. The MIG of the app that then runs ends the job. Run it from the app's MIG, on "
        'either copy of its config volume. See docs/DESIGN.md, "The cut-over protocol".'
    )

    def add_arguments(self, parser):
        parser.add_argument("job_id", type=int, metavar="JOB")
        parser.add_argument(
            "--give-up-target",
            action="store_true",
            help="after a commit whose target never started (so it took no writes): give the target "
            "up, and start the source instead",
        )

    def handle(self, *args, **options):
        try:
            job = MigrationJob.objects.active().get(pk=options["job_id"])
        except MigrationJob.DoesNotExist:
            raise CommandError(f"no active job {options['job_id']}") from None
        try:
            done = migration.recover(job, give_up_target=options["give_up_target"])
        except migration.RecoverError as e:
            raise CommandError(f"job {job.pk}: {e}") from None
        except (GridError, ConfigError) as e:
            raise CommandError(f"job {job.pk}: {e}; nothing more was done") from None
        for line in done:
            self.stdout.write(f"job {job.pk}: {line}")
        if not done:
            self.stdout.write(f"job {job.pk}: nothing to do: the app runs where the cut-over decided")
