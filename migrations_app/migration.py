"""
A migration or snapshot, as MIG drives it: pre-flight, launch, follow, and completion.

    preflight()  checks everything it can before the lock is taken (DESIGN.md, phase 1)
    acquire()    takes the lock and creates the job
    provision()  provisions the helper on the target grid (phase 2)
    Follower     mirrors the helper's progress into the job while MIG still runs (phase 4)
    complete()   the startup decision table: finish or clean up, wherever the app came up

Every remote step is idempotent, so completing twice, or after a crash half-way, ends in
the same state. Nothing is deleted unless the job's own record says this job created it.
"""

import json
import logging
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from django import db
from django.conf import settings
from django.utils import timezone

from . import catalog, config
from .grids import (
    AppNotFound,
    AppState,
    ConfigError,
    GridError,
    HostKeyError,
    InvalidName,
    TransportError,
    helper_name,
    validate_name,
)
from .grids.transport import load_private_key
from .helper import protocol
from .helper.progress import human_bytes, parse_lines
from .models import Lock, MigrationJob

log = logging.getLogger("mig.migration")

SPACE_MARGIN = 64 << 20
DEFAULT_RATE = 50 << 20  # bytes/s, for estimates before any job has been measured


class PreflightError(Exception):
    """A reason not to start, tied to the form field it concerns (None: the whole form)."""

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


class LaunchError(Exception):
    pass


def allowed_actions():
    mode = settings.MIG_MODE
    return [a for a in MigrationJob.Action.values if mode in ("both", a)]


@dataclass
class Plan:
    """What a job will do, as pre-flight found it."""

    action: str
    source_grid: object
    source_app: str
    target_grid: object
    target_app: str
    helper: str
    volumes: list = field(default_factory=list)
    bytes: int = 0
    files: int = 0
    target_free: int = 0
    stale_helper: bool = False  # a helper of an earlier job is there: provisioning replaces it

    @property
    def estimated_seconds(self):
        recent = (
            MigrationJob.objects.filter(state=MigrationJob.State.DONE, rate__gt=0)
            .order_by("-finished")
            .values_list("rate", flat=True)
            .first()
        )
        return self.bytes / (recent or DEFAULT_RATE)

    def describe(self):
        source = f"{self.source_grid.name}/{self.source_app}"
        lines = [
            f"{self.action} {source} → {self.target_grid.name}/{self.target_app}",
            f"helper: {self.helper} on {self.target_grid.name}"
            + (" (a stale one will be destroyed first)" if self.stale_helper else ""),
        ]
        for v in self.volumes:
            lines.append(f"  volume {v.name:<16} {human_bytes(v.bytes or 0):>12}  {v.files or 0} files")
        lines.append(
            f"total {human_bytes(self.bytes)} in {self.files} files; "
            f"{human_bytes(self.target_free)} free on {self.target_grid.name}; "
            f"estimated copy time {self.estimated_seconds:.0f}s"
        )
        return "\n".join(lines)

    def to_dict(self):
        return {
            "volumes": [{"name": v.name, "bytes": v.bytes, "files": v.files} for v in self.volumes],
            "bytes": self.bytes,
            "files": self.files,
            "target_free": self.target_free,
        }


# --- pre-flight --------------------------------------------------------------------------


def preflight(target_grid_name, target_app, action):
    """Check a job before it starts; raises PreflightError naming the field at fault."""
    if action not in allowed_actions():
        raise PreflightError(f"MIG_MODE={settings.MIG_MODE} does not allow {action}", "action")
    try:
        validate_name(target_app)
        helper = helper_name(target_app)
    except InvalidName as e:
        raise PreflightError(str(e), "target_app") from None
    here_grid, here_app = config.here()
    if not here_grid or not here_app:
        raise PreflightError("MIG does not know where it runs: MIG_GRID and MIG_APP are not set")
    try:
        grids = config.grid_configs()
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    if target_grid_name not in grids:
        raise PreflightError(f"no grid {target_grid_name!r} in grid.info", "target_grid")
    if here_grid not in grids:
        raise PreflightError(f"this app's grid {here_grid!r} (MIG_GRID) is not in grid.info")
    source_grid, target_grid = grids[here_grid], grids[target_grid_name]
    if (here_grid, here_app) == (target_grid_name, target_app):
        raise PreflightError("that is this app itself: choose another name or grid", "target_app")
    if source_grid.transport == "local" and target_grid.transport != "local":
        raise PreflightError(
            f"the helper runs on {target_grid.name} and cannot reach {source_grid.name}, which is "
            f"local to MIG: give {source_grid.name} an ssh transport in grid.info",
            "target_grid",
        )
    if held := Lock.objects.current():
        raise PreflightError(
            f"another job holds the lock: job #{held.job_id} ({held.job.get_state_display()})"
        )
    if "ssh" in (source_grid.transport, target_grid.transport):
        try:
            load_private_key(settings.MIG_PRIVATE_KEY_FILE)
        except GridError as e:
            raise PreflightError(str(e)) from None

    plan = Plan(action, source_grid, here_app, target_grid, target_app, helper)
    with ThreadPoolExecutor(max_workers=2) as pool:
        source_check = pool.submit(check_source, plan)
        target_check = pool.submit(check_target, plan)
        # Target problems concern what the operator typed: report them first.
        target_check.result()
        source_check.result()
    need = plan.bytes + plan.bytes // 10 + SPACE_MARGIN
    if plan.target_free < need:
        raise PreflightError(
            f"not enough space on {target_grid.name}: the copy needs {human_bytes(need)}, "
            f"{human_bytes(plan.target_free)} is free",
            "target_grid",
        )
    return plan


def check_source(plan):
    try:
        with config.driver_for(plan.source_grid) as source:
            info = source.info()
            app = source.describe(plan.source_app, sizes=True)
    except GridError as e:
        raise PreflightError(f"source grid {plan.source_grid.name}: {e}") from None
    if not info.rsync:
        raise PreflightError(f"rsync is not installed on {plan.source_grid.name}'s host")
    if app.state != AppState.RUNNING:
        raise PreflightError(f"this app is {app.state} on {plan.source_grid.name}, not running")
    plan.volumes, plan.bytes, plan.files = app.volumes, app.bytes, app.files


def check_target(plan):
    name = plan.target_grid.name
    try:
        with config.driver_for(plan.target_grid) as target:
            info = target.info()
            if problem := info.problem(plan.target_grid):
                raise PreflightError(f"{name}: {problem[1]}", "target_grid")
            apps = {a.name: a.state for a in target.list_apps()}
    except HostKeyError as e:
        raise PreflightError(f"{name}: {e}", "target_grid") from None
    except (TransportError, GridError) as e:
        raise PreflightError(f"{name} cannot be reached: {e}", "target_grid") from None
    if plan.target_app in apps:
        raise PreflightError(f"an app named {plan.target_app} already exists on {name}", "target_app")
    helper_state = apps.get(plan.helper)
    if helper_state in (AppState.RUNNING, AppState.STARTING):
        raise PreflightError(
            f"{plan.helper} is already running on {name}: another job is copying to this name",
            "target_app",
        )
    plan.stale_helper = helper_state is not None
    plan.target_free = info.free_bytes or 0


# --- launch ------------------------------------------------------------------------------


def acquire(plan, started_by, bwlimit_kbps=None):
    """Take the lock and create the job for `plan`. Raises LockHeld."""
    lock = Lock.acquire(
        action=plan.action,
        source_grid=plan.source_grid.name,
        source_app=plan.source_app,
        target_grid=plan.target_grid.name,
        target_app=plan.target_app,
        helper_app=plan.helper,
        started_by=started_by,
        bwlimit_kbps=bwlimit_kbps,
        bytes_total=plan.bytes,
        status_token=secrets.token_urlsafe(32),
    )
    job = lock.job
    job.event(f"Pre-flight passed: {human_bytes(plan.bytes)} in {plan.files} files", data=plan.to_dict())
    return job


def provision(job):
    """Provision the job's helper on the target grid. Raises LaunchError, ending the job."""
    job.set_state(MigrationJob.State.PROVISIONING)
    try:
        target_grid = config.grid_config(job.target_grid)
        with config.driver_for(target_grid) as target:
            try:
                provision_helper(job, target)
            except (GridError, OSError) as e:
                job.event(f"could not provision the helper: {e}", level="error")
                target.destroy(job.helper_app)
                raise
    except (GridError, ConfigError, OSError) as e:
        reason = f"could not provision the helper: {e}"
        job.finish(MigrationJob.State.FAILED, reason)
        job.release_lock()
        raise LaunchError(reason) from None
    return job


def helper_config(job):
    grids = config.grid_configs()
    source, target = grids[job.source_grid], grids[job.target_grid]
    return {
        "job": job.pk,
        "action": job.action,
        "source": {"grid": source.name, "app": job.source_app, "table": source.to_table()},
        "target": {"grid": target.name, "app": job.target_app, "table": target.to_table()},
        "bwlimit_kbps": job.bwlimit_kbps,
        "stall_timeout": settings.MIG_STALL_TIMEOUT,
        "bytes_total": job.bytes_total,
    }


def provision_helper(job, target):
    if target.exists(job.helper_app):
        target.destroy(job.helper_app)
        job.event(f"Destroyed a stale {job.helper_app} left by an earlier job")
    files, version = catalog.helper_template()
    if target.ensure_template(protocol.TEMPLATE, files, version):
        job.event(f"Installed the {protocol.TEMPLATE} template (version {version}) on {job.target_grid}")
    key_file = Path(settings.MIG_PRIVATE_KEY_FILE)
    secrets_ = {
        protocol.SECRET_CONFIG: json.dumps(helper_config(job)).encode(),
        protocol.SECRET_TOKEN: job.status_token.encode(),
        # The key travels as a file (mode 0600), never on a command line or in an environment.
        protocol.SECRET_KEY: key_file.read_bytes() if key_file.exists() else b"",
    }
    target.provision(job.helper_app, protocol.TEMPLATE, secrets=secrets_)
    job.event(f"Provisioned {job.helper_app} on {job.target_grid}")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text, _ = target.read_file(job.helper_app, protocol.STATUS_FILE)
        if text:
            job.status_url = json.loads(text)["url"]
            job.save(update_fields=["status_url", "updated"])
            return
        time.sleep(0.1)
    raise GridError(f"{job.helper_app} did not start its status endpoint")


def spawn_manage(*args, new_log=False, log=True):
    """Run `manage.py ARGS` in the background, logging to the config volume's migration.log
    (or, with log=False, to this process's own output).

    The process stays in MIG's own session: when the helper stops this app, it stops with
    it, and never writes to the database while the final copy is taken.
    """
    # One log per migration, overwritten by the next, as in the original.
    log_path = settings.CONFIG_DIR / "logs" / "migration.log"
    if log:
        log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "w" if new_log else "a") if log else nullcontext(None) as out:
        proc = subprocess.Popen(
            [sys.executable, str(settings.BASE_DIR / "manage.py"), *args],
            cwd=settings.BASE_DIR,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log else None,
        )
    # Reap it when it ends, so a long-lived web worker collects no zombies.
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def start_follower(job):
    """Follow the job in the background (migrate_app without --wait, or after a restart)."""
    return spawn_manage("follow_job", str(job.pk))


def start_in_background(job):
    """Provision the helper and follow the job in the background (the web interface)."""
    return spawn_manage("migrate_app", "--job", str(job.pk), new_log=True)


def wait_until_answering(app_url, timeout):
    """True once the MIG at `app_url` answers its ping, False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(app_url + "ping/", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.05)
    return False


# --- following ---------------------------------------------------------------------------


class Follower:
    """Mirrors the helper's progress log into the job while MIG runs.

    Once the helper says hands off (before it hashes, then stops, the source), the
    follower stops writing to the database: the final pass will copy it, and must find it
    still. When the source starts stopping, a background follower (`until_stop`) has
    nothing left to do and returns "handed over"; one in a terminal keeps showing progress
    until the helper's result. If the helper ends without stopping the source, MIG runs
    on here, and the follower completes the job.
    """

    def __init__(self, job, on_line=None, until_stop=False):
        self.job = job
        self.on_line = on_line or (lambda line: None)
        self.until_stop = until_stop
        self.write_db = True
        self.source_stopping = False
        self.result = self.error = None

    def run(self):
        job = self.job
        target_config = config.grid_config(job.target_grid)
        seen = (
            job.events.filter(seq__isnull=False).order_by("-seq").values_list("seq", flat=True).first() or 0
        )
        try:
            with config.driver_for(target_config) as target:
                for raw in target.follow(job.helper_app, protocol.PROGRESS_FILE):
                    lines = parse_lines(raw)
                    if not lines or lines[0]["seq"] <= seen:
                        continue
                    line = lines[0]
                    seen = line["seq"]
                    if self.write_db:
                        job.apply_helper_lines([line])
                        # Hold no database connection between writes: it must not be open
                        # (or be the one to checkpoint) while the helper copies the file.
                        db.connection.close()
                    self.on_line(line)
                    if line.get("fact") == protocol.HANDS_OFF:
                        self.write_db = False
                    if line.get("fact") == protocol.SOURCE_STOPPING:
                        self.source_stopping = True
                        if self.until_stop:
                            return "handed over"
                    if line.get("fact") == protocol.RESULT:
                        self.result, self.error = line.get("result"), line.get("error", "")
                        break
        except GridError as e:
            log.warning("job %s: lost the helper's progress: %s", job.pk, e)
        if not self.source_stopping:
            # MIG still runs, so this is the source: the helper failed or is gone.
            return complete(job, wait=0)
        return self.result


# --- completion: the startup decision table ---------------------------------------------


def file_helper_log(job, target, wait):
    """File the helper's log into the job's events; wait up to `wait` s for its result.

    Returns the helper app's state, or None if it no longer exists.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            state = target.state(job.helper_app)
        except AppNotFound:
            state = None
        if state is not None:
            text, _ = target.read_file(job.helper_app, protocol.PROGRESS_FILE)
            job.apply_helper_lines(parse_lines(text))
        if job.helper_summary().result or state not in (AppState.RUNNING, AppState.STARTING):
            return state
        if time.monotonic() >= deadline:
            return state
        time.sleep(0.3)


def complete(job, wait=None, here=None):
    """Finish or clean up `job` from wherever this MIG runs (DESIGN.md's startup table).

    Returns what happened: "done", "failed", "cleared", "following" or "left" (nothing
    could be decided safely; the lock stays and an event says why).
    """
    wait = settings.MIG_HELPER_WAIT if wait is None else wait
    here = here or config.here()
    source = (job.source_grid, job.source_app)
    target = (job.target_grid, job.target_app)
    if here == target and job.action == MigrationJob.Action.SNAPSHOT:
        return clear_snapshot_copy(job)
    if here not in (source, target):
        job.event(
            f"This MIG runs in {here[0]}/{here[1]}, neither the source nor the target of the job: "
            "leaving the lock for an operator",
            level="warning",
        )
        return "left"
    try:
        target_grid = config.grid_config(job.target_grid)
        with config.driver_for(target_grid) as target_driver:
            helper_state = file_helper_log(job, target_driver, wait)
            summary = job.helper_summary()
            if here == source:
                return complete_on_source(job, target_driver, helper_state, summary)
            return complete_on_target(job, target_driver, summary)
    except (GridError, ConfigError) as e:
        job.event(f"Could not finish the job now: {e}; the next startup will retry", level="warning")
        return "left"


def mark_app_up(job):
    if job.app_up is None:
        MigrationJob.objects.filter(pk=job.pk, app_up__isnull=True).update(app_up=timezone.now())
        job.refresh_from_db()


def complete_on_source(job, target, helper_state, summary):
    if summary.result is None and helper_state in (AppState.RUNNING, AppState.STARTING):
        # The helper is still at work (only MIG restarted): keep following it.
        return "following"
    if job.action == MigrationJob.Action.SNAPSHOT and summary.result == "ok":
        mark_app_up(job)
        target.destroy(job.helper_app)
        job.event(f"Snapshot complete; destroyed {job.helper_app}; source back up")
        job.finish(MigrationJob.State.DONE)
        job.release_lock()
        return "done"
    if summary.result == "ok":
        # A migration that succeeded, yet the source runs: someone started it by hand.
        # The target's MIG removes this source; deleting anything here would be a guess.
        job.event(
            "The migration succeeded but the source app is running again: leaving both for "
            "the target's MIG to finish",
            level="warning",
        )
        return "left"
    return clean_up_failure(job, target, summary, helper_state)


def clean_up_failure(job, target, summary, helper_state):
    """The job failed: remove the helper and any target this job created; the source runs."""
    if summary.error:
        reason = summary.error
    elif helper_state is None:
        reason = "the helper disappeared before reporting a result"
    else:
        reason = f"the helper stopped unexpectedly during {summary.phase or 'provisioning'}"
        if last := summary.latest.get("message"):
            reason += f" (last message: {last})"
    if job.target_created and target.exists(job.target_app):
        if target.state(job.target_app) == AppState.RUNNING:
            job.event(f"{job.target_app} is running on {job.target_grid}: not removing it", level="warning")
        else:
            target.destroy(job.target_app)
            job.event(f"Removed the partial target {job.target_app} on {job.target_grid}")
    target.destroy(job.helper_app)
    if job.source_stopped:
        mark_app_up(job)
    job.event(f"Destroyed {job.helper_app}; the source app runs. The job failed: {reason}", level="error")
    job.finish(MigrationJob.State.FAILED, reason)
    job.release_lock()
    return "failed"


def complete_on_target(job, target, summary):
    """The migrated app came up here: remove the helper and the source, and finish."""
    if summary.result != "ok":
        detail = f"its result is {summary.result}" if summary.result else "it has not reported a result"
        job.event(
            f"This copy started but the helper says {detail}: leaving everything as it is", level="warning"
        )
        return "left"
    mark_app_up(job)
    target.destroy(job.helper_app)
    source_grid = config.grid_config(job.source_grid)
    with config.driver_for(source_grid) as source:
        if source.exists(job.source_app):
            state = source.state(job.source_app)
            if state in (AppState.RUNNING, AppState.STARTING):
                job.event(
                    f"The source app {job.source_app} is running again on {job.source_grid}: not "
                    "destroying it; resolve by hand, then override the lock",
                    level="error",
                )
                return "left"
            source.destroy(job.source_app)
            job.event(f"Destroyed the source app {job.source_app} on {job.source_grid}")
    job.event(f"Migration complete: {job.target_app} runs on {job.target_grid}")
    job.finish(MigrationJob.State.DONE)
    job.release_lock()
    return "done"


def clear_snapshot_copy(job):
    job.event(
        "This is the snapshot copy, started by hand: nothing to do on any grid; clearing the "
        "lock that was copied with it"
    )
    job.finish(MigrationJob.State.DONE)
    job.release_lock()
    return "cleared"
