import getpass
import signal
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from migrations_app import config, migration, snapshots
from migrations_app.helper import protocol
from migrations_app.helper.progress import human_bytes
from migrations_app.management.prompts import confirm
from migrations_app.models import LockHeld, MigrationJob


class ProgressPrinter:
    """Shows the helper's progress: a bar on a terminal, plain lines otherwise."""

    def __init__(self, out, tty):
        self.out, self.tty = out, tty
        self.bar_shown = False

    def __call__(self, line):
        if line.get("kind") == protocol.PROGRESS:
            if self.tty:
                self.out.write("\r" + self.bar(line), ending="")
                self.out.flush()
                self.bar_shown = True
            return
        if self.bar_shown:
            self.out.write("")
            self.bar_shown = False
        level = line.get("level", "info")
        prefix = "" if level == "info" else f"{level.upper()}: "
        self.out.write(f"[{line.get('phase', '')}] {prefix}{line.get('message', '')}")

    @staticmethod
    def bar(line, width=30):
        step = protocol.StepProgress.from_line(line)
        if not step.total:  # the final pass: how much changed is found as it goes
            return f"{step.message}: {human_bytes(step.done)} sent".ljust(100)
        done, total = min(step.done, step.total), step.total
        filled = int(width * done / total)
        eta = f"ETA {step.eta:.0f}s" if step.eta is not None else "ETA: estimating"
        return (
            f"[{'#' * filled}{'-' * (width - filled)}] {100 * done / total:5.1f}% "
            f"{human_bytes(done)}/{human_bytes(total)} "
            f"{human_bytes(step.rate)}/s {eta} {step.message}"
        ).ljust(100)


class Command(BaseCommand):
    help = (
        "Migrate this app, or take a snapshot copy of it, to TARGET_GRID as TARGET_APP. Runs the "
        "pre-flight and prints the plan (what is copied, how long it should take, how long the app "
        "is down, what is destroyed), asks to go ahead (--yes: don't ask), then takes the lock, "
        "provisions the helper on the target grid and prints the job id. The app (and MIG with it) "
        "stops during the copy; where it comes up, `startup` finishes the job. `manage.py cancel JOB` "
        "cancels it until the copy is verified."
    )

    def add_arguments(self, parser):
        parser.add_argument("target_grid", metavar="TARGET_GRID", help="a grid from grid.info")
        parser.add_argument("target_app", metavar="TARGET_APP", help="the app's name on the target grid")
        parser.add_argument(
            "--action",
            choices=MigrationJob.Action.values,
            help="migrate (move the app) or snapshot (copy it, leave it running); "
            "required when MIG_MODE allows both",
        )
        parser.add_argument("--wait", action="store_true", help="follow the job here, with a progress bar")
        parser.add_argument(
            "--dry-run", action="store_true", help="run the pre-flight and print the plan; change nothing"
        )
        parser.add_argument(
            "--yes", action="store_true", help="start without asking (for scripts); the plan is still printed"
        )
        parser.add_argument("--bwlimit", type=int, metavar="KBPS", help="cap the copy at KBPS KiB/s")
        parser.add_argument(
            "--max-downtime",
            type=float,
            metavar="SECONDS",
            help="the downtime this app may have: before the stop, the helper predicts it, copies "
            "again while what changes meanwhile puts it over, then does what --over-budget says",
        )
        parser.add_argument(
            "--over-budget",
            choices=[o.value for o in protocol.OverBudget],
            help="with --max-downtime, if the prediction is still over it: stop (the default: end "
            "the job before the stop, this app keeps running) or proceed (go on, over the budget)",
        )
        parser.add_argument(
            "--refresh",
            action="store_true",
            help="TARGET_GRID/TARGET_APP is a snapshot copy this app made: bring it up to date (only the "
            "changes move); implies --action snapshot",
        )

    def handle(self, *args, **options):
        refresh = None
        if options["refresh"]:
            if options["action"] == "migrate":
                raise CommandError("--refresh takes a snapshot: it cannot be a migration")
            options["action"] = "snapshot"
            try:
                refresh = snapshots.find(f"{options['target_grid']}/{options['target_app']}")
            except snapshots.SnapshotError as e:
                raise CommandError(str(e)) from None
        action = options["action"] or self.default_action()
        bwlimit = options["bwlimit"]
        if bwlimit is not None and bwlimit <= 0:
            raise CommandError("--bwlimit must be a positive number of KiB/s")
        budget = self.budget(options["max_downtime"], options["over_budget"])
        # One connection to each grid, from pre-flight to the end: each new one would cost
        # an SSH handshake and an agent start, on a job's way.
        with config.keeping_drivers():
            self.migrate(options, action, bwlimit, refresh, budget)

    def migrate(self, options, action, bwlimit, refresh, budget):
        try:
            plan = migration.preflight(
                options["target_grid"], options["target_app"], action, bwlimit, refresh, budget
            )
        except migration.PreflightError as e:
            raise CommandError(f"pre-flight: {e}") from None
        self.stdout.write(plan.describe())
        if options["dry_run"]:
            self.stdout.write("dry run: no lock taken, nothing changed")
            return
        if not options["yes"]:
            self.confirm(plan)
        try:
            job = migration.acquire(plan, f"{getpass.getuser()} (command line)")
            # Here, not in the background: a helper that cannot be provisioned is this
            # command's error.
            migration.provision(job)
        except LockHeld as e:
            raise CommandError(f"refused: {e}") from None
        except migration.LaunchError as e:
            raise CommandError(str(e)) from None
        self.stdout.write(
            f"job {job.pk}: {job.action} {job.source_grid}/{job.source_app} → "
            f"{job.target_grid}/{job.target_app}; helper {job.helper_app} is running"
        )
        if not options["wait"]:
            migration.start_runner(job)
            return
        self.follow(job)

    @staticmethod
    def budget(seconds, over):
        if seconds is None:
            if over is not None:
                raise CommandError("--over-budget says what to do over a budget: give it with --max-downtime")
            return None
        try:
            return migration.DowntimeBudget(seconds, over)
        except ValueError as e:
            raise CommandError(f"--max-downtime: {e}") from None

    def confirm(self, plan):
        """Ask before anything changes; without a terminal to ask on, --yes is required."""
        what = "migrate (the source app is destroyed afterwards)" if plan.action == "migrate" else "snapshot"
        confirm(f"Go ahead and {what}?", "not started: add --yes to start without asking (the plan is above)")

    def default_action(self):
        allowed = migration.allowed_actions()
        if len(allowed) == 1:
            return allowed[0]
        raise CommandError("choose --action migrate or --action snapshot")

    def follow(self, job):
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
        runner = migration.Runner(job, ProgressPrinter(self.stdout, self.stdout.isatty()), watch=True)
        outcome = runner.run()
        if runner.write_db:  # the record is ours to read only while MIG may write it
            job.refresh_from_db()
        Outcome = migration.Outcome
        if outcome == Outcome.FAILED:
            raise CommandError(f"job {job.pk} failed: {runner.error or job.error}")
        if outcome == Outcome.CANCELLED:
            raise CommandError(f"job {job.pk} was cancelled: {runner.error or job.error}")
        if outcome == Outcome.HELD:
            raise CommandError(f"job {job.pk} is held: {job.attention}")
        if outcome == Outcome.RETRY:
            raise CommandError(f"job {job.pk}: could not finish it now (see its events); MIG tries again")
        if outcome != Outcome.DONE:
            self.stdout.write(
                f"job {job.pk}: the source stopped and the helper's result is not known here; the "
                "app's MIG finishes the job where the app comes up"
            )
        elif job.action == MigrationJob.Action.MIGRATE:
            self.wait_for_target(job)
        else:
            self.stdout.write(f"job {job.pk}: snapshot taken; the source app restarts")

    def wait_for_target(self, job):
        url = job.target_url  # as the helper said, once it had defined the target
        if url and migration.wait_until_answering(url, settings.MIG_HELPER_WAIT):
            self.stdout.write(f"job {job.pk}: migrated; MIG answers at {url}")
        else:
            self.stdout.write(f"job {job.pk}: migrated; the target's MIG has not answered yet at {url}")
