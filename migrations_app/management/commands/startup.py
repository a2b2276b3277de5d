import errno
import itertools
import logging
import os
import shutil
import stat
import time
from contextlib import contextmanager

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

from migrations_app import config, migration
from migrations_app.grids import ConfigError
from migrations_app.grids.gridinfo import GridConfig
from migrations_app.helper.progress import human_bytes
from migrations_app.migration import Outcome
from migrations_app.models import Grid, Lock, MigrationJob

CONFIG_SUBDIRS = ("logs",)
log = logging.getLogger("mig.startup")


def make_private(directory):
    """Take group and others' rights from `directory` and everything in it (symlinks are
    neither followed nor changed): the config volume holds sessions, the password hash and
    status tokens. Files written before MIG set its umask, or copied in by hand, get
    repaired here. Returns how many entries changed."""
    changed = 0
    for parent, dirs, files in os.walk(directory):
        for path in [parent, *(os.path.join(parent, name) for name in dirs + files)]:
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
                changed += 1
    return changed


# Free bytes under which the config volume counts as full: SQLite needs a little room to
# open a database (its shared-memory file) and to write a transaction.
FULL_BELOW = 1 << 20


def disk_full(error):
    """Whether a database or file error comes from a full config volume."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "disk is full" in str(error):
        return True
    # SQLite says only "disk I/O error" when it cannot even create its shared-memory file.
    return "disk I/O error" in str(error) and shutil.disk_usage(settings.CONFIG_DIR).free < FULL_BELOW


def config_volume_full():
    free = human_bytes(shutil.disk_usage(settings.CONFIG_DIR).free)
    where = f"{settings.MIG_GRID or 'this grid'} (MIG's config volume, {settings.CONFIG_DIR}, {free} free)"
    return f"disk full on {where}"


class ConfigVolumeFull(CommandError):
    pass


@contextmanager
def naming_a_full_volume(what):
    """A database or file error from a full config volume says so, and what it stopped."""
    try:
        yield
    except (DatabaseError, OSError) as e:
        if disk_full(e):
            raise ConfigVolumeFull(f"{config_volume_full()}: {what} ({e})") from None
        raise


class Command(BaseCommand):
    help = (
        "Run each time MIG starts: prepare the config volume, database, grids and login user, "
        "then finish or clean up a job whose lock travelled with the app (docs/DESIGN.md's startup "
        "table). Safe to run any number of times; a second run changes nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--keep-trying",
            action="store_true",
            help="if a grid cannot be reached (or the config volume is full), try again with backoff "
            "until the job is finished or held, or SIGTERM arrives (how `serve` runs it)",
        )
        parser.add_argument(
            "--mig-since",
            type=float,
            metavar="EPOCH",
            help="this MIG has run since EPOCH (seconds; `serve` passes its start): a job it started "
            "since then, and has not provisioned its helper for yet, is its own, not one left behind",
        )

    def handle(self, **options):
        # SIGTERM (MIG's app stopping) ends this at once, as it should: the app has seconds to
        # stop, and every row of the table is idempotent, so the next start takes it up.
        # Read every input first, so bad configuration stops before anything is written.
        grids = self.read_grid_info()
        delays = itertools.chain(migration.RETRY_DELAYS, itertools.repeat(migration.RETRY_DELAYS[-1]))
        while True:
            try:
                self.prepare(grids)
                with naming_a_full_volume("cannot record the login"):
                    self.step_login_user()
                active = self.step_lock(options["keep_trying"], options["mig_since"])
                break
            except ConfigVolumeFull as e:
                if not options["keep_trying"]:
                    raise
                delay = next(delays)
                self.warn(f"{e}; trying again in {delay}s")
                time.sleep(delay)
        if self.changes:
            self.stdout.write(f"startup: done, {len(self.changes)} change(s).")
        elif active:
            self.stdout.write(f"startup: job #{active.pk} is still active ({active.get_state_display()}).")
        else:
            self.stdout.write("startup: nothing to do, everything was already in place.")

    def prepare(self, grids: dict[str, GridConfig] | None):
        """What MIG needs before it can answer: the config volume, the database, grid.info's
        grids (`grids`, from read_grid_info; the form lists them the moment MIG answers), and a
        login user (someone may log in then too). Checking that user's password costs a
        password hash (0.3 s), so an existing user is checked after, in the background."""
        self.changes = []
        with naming_a_full_volume("MIG cannot open its database"):
            self.step_config_dir()
            self.step_database()
            if settings.MIG_GRID and MigrationJob.objects.arrived(settings.MIG_GRID, settings.MIG_APP):
                self.stdout.write("this is the target of the migration under way: its app has started here")
        with naming_a_full_volume("cannot record the grids and the login"):
            self.step_grids(grids)
            if not get_user_model().objects.filter(username=settings.MIG_USERNAME, is_active=True).exists():
                self.step_login_user()

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
        if repaired := make_private(settings.CONFIG_DIR):
            entries = "entry" if repaired == 1 else "entries"
            self.changed(f"made {repaired} {entries} of {settings.CONFIG_DIR} private")
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

    def step_lock(self, keep_trying, mig_since=None):
        """The lock's row of the startup table; returns the job if it is still active."""
        lock = Lock.objects.current()
        if lock is None:
            return None
        job = lock.job
        if mig_since is not None and job.starting_since(mig_since):
            # Started here, by the web page or migrate_app, as this startup ran in the
            # background: the process that started it provisions it. Taken for a job left
            # behind, it would be cleaned up under that process's feet.
            self.stdout.write(f"  job #{job.pk} was started since MIG came up; its own process runs it")
            return job
        if not all(config.here()):
            self.warn(f"job #{job.pk} holds the lock, but MIG_GRID/MIG_APP are not set: leaving it")
            return job
        self.stdout.write(f"  job #{job.pk} ({job.action}) holds the lock; finishing it")
        delays = itertools.chain(migration.RETRY_DELAYS, itertools.repeat(migration.RETRY_DELAYS[-1]))
        while True:
            outcome, why = self.finish(job)
            if outcome != Outcome.RETRY or not keep_trying:
                break
            delay = next(delays)
            self.warn(f"job #{job.pk}: {why}; trying again in {delay}s")
            time.sleep(delay)
        job.refresh_from_db()
        if outcome == Outcome.FOLLOWING:
            # Only MIG restarted while its helper works on: keep mirroring its progress.
            migration.start_runner(job)
            self.stdout.write(f"  job #{job.pk}: the helper is still at work; following it")
        elif outcome == Outcome.HELD:
            self.warn(f"job #{job.pk} is held: {job.attention}")
        elif outcome == Outcome.RETRY:
            self.warn(f"job #{job.pk}: {why}; run startup again, or let MIG's own startup retry")
        else:
            self.changed(f"job #{job.pk}: {outcome}" + (f" ({job.error})" if job.error else ""))
        return job if job.is_active else None

    def finish(self, job):
        """(outcome, why it could not finish now) of the startup table's row for `job`."""
        try:
            outcome = migration.complete(job)
        except (DatabaseError, OSError) as e:
            if not disk_full(e):
                return self.unexpected(job, e)
            return Outcome.RETRY, f"{config_volume_full()}: cannot record the end of the job ({e})"
        except Exception as e:
            return self.unexpected(job, e)
        if outcome == Outcome.RETRY:
            last = job.events.order_by("-created", "-pk").first()
            return outcome, last.message if last else "a grid could not be reached"
        return outcome, ""

    def unexpected(self, job, error):
        """A fault nobody foresaw: the job says so and waits for an operator."""
        log.exception("job %s: startup failed", job.pk)
        job.hold(
            f"MIG's startup failed while finishing the job: {type(error).__name__}: {error}. Run "
            f"`manage.py startup` again once the cause is fixed, or `manage.py recover {job.pk}`."
        )
        return Outcome.HELD, str(error)

    def step_login_user(self):
        User = get_user_model()
        username, password = settings.MIG_USERNAME, settings.MIG_PASSWORD
        if settings.MIG_NO_LOGIN:
            self.warn("MIG_NO_LOGIN is set: the web interface asks for no login, on loopback only")
            username = None
        elif settings.MIG_PASSWORD_FILE:
            self.stdout.write(
                f"MIG_USERNAME is not set: log in as {username!r} with the password kept in "
                f"{settings.MIG_PASSWORD_FILE} (mode 0600), or set MIG_USERNAME and MIG_PASSWORD"
            )
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
