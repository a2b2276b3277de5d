import getpass
import time

from django.core.management.base import BaseCommand, CommandError

from migrations_app import config, migration
from migrations_app.grids import AppState, GridError
from migrations_app.helper import protocol
from migrations_app.helper.progress import parse_lines
from migrations_app.models import MigrationJob

ANSWER_WAIT = 60.0


class Command(BaseCommand):
    help = (
        "Cancel a running job. Until its copy is verified and the cut-over committed, it rolls back "
        "as a failure does: the source app runs again and what the job created is removed. After "
        "the commit the copy is the app, and the cancel is refused. Waits for the helper's answer. "
        "Run it while this app runs; once the source has stopped for the final pass, cancel from the "
        "job page, which asks the helper."
    )

    def add_arguments(self, parser):
        parser.add_argument("job_id", type=int, metavar="JOB")
        parser.add_argument("--no-wait", action="store_true", help="ask, and do not wait for the answer")

    def handle(self, *args, **options):
        self.ensure_this_app_runs()
        try:
            job = MigrationJob.objects.get(pk=options["job_id"])
        except MigrationJob.DoesNotExist:
            raise CommandError(f"no job {options['job_id']}") from None
        try:
            said = migration.cancel(job, f"{getpass.getuser()} (command line)")
        except migration.CancelError as e:
            raise CommandError(str(e)) from None
        self.stdout.write(said)
        if not options["no_wait"]:
            self.wait_for_answer(job)

    def ensure_this_app_runs(self):
        """Once the source has stopped, the final pass copies MIG's database: this command
        must not even open it (a reader may checkpoint it). Asked before it is opened."""
        grid, app = config.here()
        if not grid or not app:
            return  # not inside an app (a test, a shell): nothing is being copied
        try:
            with config.driver_for(config.grid_config(grid)) as driver:
                state = driver.state(app)
        except GridError as e:
            raise CommandError(f"cannot tell whether {grid}/{app} runs: {e}") from None
        if state != AppState.RUNNING:
            raise CommandError(
                f"{grid}/{app} is {state}: its volumes are being copied, so this command leaves them alone. "
                "Cancel from the job page (it asks the helper), or wait for the app to run again."
            )

    def wait_for_answer(self, job):
        """The helper's answer, from its journal: rolling back, or refused."""
        deadline = time.monotonic() + ANSWER_WAIT
        target = config.grid_config(job.target_grid)
        while time.monotonic() < deadline:
            try:
                with config.driver_for(target) as driver:
                    text, _ = driver.read_file(job.helper_app, protocol.PROGRESS_FILE)
            except GridError:
                text = ""
            for line in parse_lines(text):
                if line.get("fact") == protocol.CANCEL_REFUSED:
                    raise CommandError(f"job {job.pk}: {line['message']}")
                if line.get("fact") == protocol.RESULT:
                    self.stdout.write(f"job {job.pk}: {line['message']}: {line.get('error', '')}")
                    return
            time.sleep(0.5)
        self.stdout.write(
            f"job {job.pk}: no answer from the helper within {ANSWER_WAIT:g}s; see the job page"
        )
