import getpass

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from migrations_app import snapshots
from migrations_app.helper.progress import human_bytes
from migrations_app.management.prompts import confirm
from migrations_app.models import Snapshot


class Command(BaseCommand):
    help = (
        "List the snapshot copies this app made (grid, name, when taken, size, state on its grid). "
        "--start starts one as an app of its own, --refresh brings one up to date (a snapshot into "
        "it: only the changes move), --delete removes one with its data. Each asks first; --yes "
        "does not ask."
    )

    def add_arguments(self, parser):
        actions = parser.add_mutually_exclusive_group()
        actions.add_argument("--start", metavar="GRID/APP", help="start the copy as an app of its own")
        actions.add_argument("--refresh", metavar="GRID/APP", help="bring the copy up to date")
        actions.add_argument("--delete", metavar="GRID/APP", help="delete the copy and its data")
        parser.add_argument("--yes", action="store_true", help="do it without asking")
        parser.add_argument("--wait", action="store_true", help="--refresh: follow the job here")

    def handle(self, *args, **options):
        if options["refresh"]:
            grid, _, app = options["refresh"].partition("/")
            flags = {"refresh": True, "yes": options["yes"], "wait": options["wait"]}
            return call_command("migrate_app", grid, app, stdout=self.stdout, stderr=self.stderr, **flags)
        for action, operation in (("start", snapshots.start), ("delete", snapshots.delete)):
            if options[action]:
                return self.act(action, operation, options[action], options["yes"])
        self.list()

    def list(self):
        seen = snapshots.look_at_all(Snapshot.objects.kept())
        if not seen:
            self.stdout.write("this app has made no snapshots")
            return
        rows = [("COPY", "TAKEN (UTC)", "SIZE", "STATE", "NOTE")]
        for s in seen:
            note = s.problem or ("refreshing" if s.refreshing else "")
            if s.snapshot.state == Snapshot.State.INCOMPLETE:
                note = "incomplete: a refresh failed while it wrote; refresh it again or delete it"
            if s.snapshot.started and not note:
                note = f"started by {s.snapshot.started_by}"
            taken = f"{s.snapshot.taken:%Y-%m-%d %H:%M:%S}"
            rows.append((s.snapshot.name, taken, human_bytes(s.snapshot.bytes), str(s.state), note))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            self.stdout.write(
                "  ".join([*(v.ljust(w) for v, w in zip(row, widths, strict=False)), row[4]]).rstrip()
            )

    def act(self, action, operation, name, yes):
        try:
            snapshot = snapshots.find(name)
        except snapshots.SnapshotError as e:
            raise CommandError(str(e)) from None
        if action == "delete":
            what = (
                f"delete {snapshot.name} and its data ({human_bytes(snapshot.bytes)}); this cannot be undone"
            )
        else:
            what = f"start {snapshot.name} as an app of its own, beside this one"
        if not yes:
            confirm(f"{what[0].upper()}{what[1:]}?", f"not done: add --yes to {what}")
        try:
            self.stdout.write(operation(snapshot, f"{getpass.getuser()} (command line)"))
        except snapshots.SnapshotError as e:
            raise CommandError(str(e)) from None
