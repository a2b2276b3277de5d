import os
import stat

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor

from migrations_app import config, migration
from migrations_app.grids import ConfigError
from migrations_app.models import Grid, Lock

CONFIG_SUBDIRS = ("logs",)


class Command(BaseCommand):
    help = (
        "Run each time MIG starts: prepare the config volume, database, grids and login user, "
        "then finish or clean up a job whose lock travelled with the app (DESIGN.md's startup "
        "table). Safe to run any number of times; a second run changes nothing."
    )
    following = None  # a job whose helper is still at work (only MIG restarted)

    def handle(self, **options):
        # Read every input first, so bad configuration stops before anything is written.
        grids = self.read_grid_info()
        self.prepare()
        self.step_grids(grids)
        self.step_login_user()
        self.step_lock()
        if self.following:
            # Only MIG restarted while its helper works on: keep mirroring its progress.
            migration.start_follower(self.following)
        if self.changes:
            self.stdout.write(f"startup: done, {len(self.changes)} change(s).")
        else:
            self.stdout.write("startup: nothing to do, everything was already in place.")

    def prepare(self):
        """What MIG needs before it can answer: the config volume and the database."""
        self.changes = []
        self.step_config_dir()
        self.step_database()

    def changed(self, message):
        self.changes.append(message)
        self.stdout.write(f"  {message}")

    def warn(self, message):
        self.stderr.write(self.style.WARNING(f"  warning: {message}"))

    def read_grid_info(self):
        path = settings.MIG_GRID_INFO_FILE
        if not path.exists():
            self.warn(f"no grid.info at {path}: MIG knows no grids yet (MIG_GRID_INFO_FILE)")
            return None
        try:
            grids = config.grid_configs()
        except ConfigError as e:
            raise CommandError(str(e)) from None
        if settings.MIG_GRID and settings.MIG_GRID not in grids:
            self.warn(f"MIG_GRID={settings.MIG_GRID!r} is not a grid in {path}")
        return grids

    def step_config_dir(self):
        for name in CONFIG_SUBDIRS:
            path = settings.CONFIG_DIR / name
            if not path.is_dir():
                path.mkdir(mode=0o700)
                self.changed(f"created {path}")
        key = settings.MIG_PRIVATE_KEY_FILE
        if key.exists() and stat.S_IMODE(key.stat().st_mode) & 0o077:
            self.warn(f"{key} is readable by others; SSH grids will refuse it (chmod 600 {key})")
        db = settings.DATABASES["default"]["NAME"]
        if os.path.exists(db) and not os.access(db, os.W_OK):
            raise CommandError(f"database {db} is not writable")

    def step_database(self):
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        if plan:
            call_command("migrate", interactive=False, verbosity=0)
            self.changed(f"applied {len(plan)} database migration(s)")

    def step_grids(self, grids):
        if grids is None:
            return
        with transaction.atomic():
            created, updated, gone = Grid.objects.sync_from(grids)
        for verb, names in (("added", created), ("updated", updated), ("unlisted", gone)):
            if names:
                self.changed(f"grids {verb}: {', '.join(names)}")

    def step_lock(self):
        lock = Lock.objects.current()
        if lock is None:
            return
        job = lock.job
        if not all(config.here()):
            self.warn(f"job #{job.pk} holds the lock, but MIG_GRID/MIG_APP are not set: leaving it")
            return
        self.stdout.write(f"  job #{job.pk} ({job.action}) holds the lock; finishing it")
        outcome = migration.complete(job)
        job.refresh_from_db()
        if outcome == "following":
            self.following = job
            self.stdout.write(f"  job #{job.pk}: the helper is still at work; following it")
        elif outcome == "left":
            last = job.events.order_by("-created", "-pk").first()
            self.warn(f"job #{job.pk}: left as it is: {last.message if last else ''}")
        else:
            self.changed(f"job #{job.pk}: {outcome}" + (f" ({job.error})" if job.error else ""))

    def step_login_user(self):
        User = get_user_model()
        username, password = settings.MIG_USERNAME, settings.MIG_PASSWORD
        if not username:
            self.warn("MIG_USERNAME is empty: the web interface asks for no login")
        # MIG has one login; a previous MIG_USERNAME must stop working.
        others = User.objects.filter(is_active=True).exclude(username=username)
        if n := others.update(is_active=False):
            self.changed(f"deactivated {n} former login user(s)")
        if not username:
            return
        user, created = User.objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            user.set_password(password)
            user.save()
            self.changed(f"created login user {username!r}")
            return
        fixes = {"is_active": True, "is_staff": True, "is_superuser": True}
        stale = {k: v for k, v in fixes.items() if getattr(user, k) != v}
        if not user.check_password(password):
            user.set_password(password)
            stale["password"] = user.password
        if stale:
            User.objects.filter(pk=user.pk).update(**stale)
            self.changed(f"updated login user {username!r}")
