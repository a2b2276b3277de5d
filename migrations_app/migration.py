"""
A migration or snapshot, as MIG drives it (docs/DESIGN.md): pre-flight, launch, run, and
completion.

    preflight()  checks everything it can before the lock is taken
    acquire()    takes the lock and creates the job
    provision()  provisions the helper on the target grid
    Runner       `run_job`: provisions the helper if that is still to do, then mirrors its
                 journal into the job while MIG runs
    complete()   the startup decision table: finish or clean up, wherever the app came up,
                 deciding from facts (the cut-over record and the helper's journal)
    recover()    an operator carries out the cut-over record's decision (`manage.py recover`)

Every remote step is idempotent, so completing twice, or after a crash half-way, ends in
the same state. Nothing is removed unless the grid says this job created it.
"""

import enum
import itertools
import json
import logging
import os
import secrets
import shutil
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
from django.db import models
from django.utils import timezone

from . import catalog, config
from .grids import (
    AppExists,
    AppNotFound,
    AppState,
    ConfigError,
    Cutover,
    Decision,
    GridError,
    HostKeyError,
    InvalidName,
    TransportError,
    helper_name,
)
from .grids.agent.procs import pid_alive, proc_stat
from .grids.driver import images_of
from .grids.transport import load_private_key
from .helper import protocol
from .helper.progress import Summary, human_bytes, parse_lines
from .models import JobEvent, Lock, MigrationJob, Snapshot

log = logging.getLogger("mig.migration")

SPACE_MARGIN = 64 << 20
# An app in one of these states may be serving, or about to.
UP = (AppState.RUNNING, AppState.STARTING)
# For estimates before any job has been measured (see Plan): copy and hashing rates in bytes
# per second, the helper's set-up, and the downtime's fixed part and its part per entry
# (the final pass lists every entry and verify checks it: 28 and 17 µs each, measured).
DEFAULT_RATE = 50 << 20
HASH_RATE = 500 << 20
PROVISION_SECONDS = 2.0
FIXED_DOWNTIME = 1.0
DOWNTIME_PER_FILE = 50e-6
# Seconds a provisioned helper has to start its status endpoint.
HELPER_START_TIMEOUT = 120.0


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


@dataclass(frozen=True)
class DowntimeBudget:
    """The downtime an operator allows, and what the job does if its helper predicts more
    before the stop (see the helper's step_budget)."""

    seconds: float
    over: protocol.OverBudget | str | None = None  # an OverBudget once made; None is STOP

    # A day: anything longer is a typo, not a budget.
    LONGEST = 86400.0

    def __post_init__(self):
        if not (0 < self.seconds <= self.LONGEST):  # NaN fails this too
            raise ValueError(f"a downtime budget is more than 0 and at most {self.LONGEST:g} seconds")
        # The form and the command pass what the operator chose, or nothing for the default.
        object.__setattr__(self, "over", protocol.OverBudget(self.over or protocol.OverBudget.STOP))

    def describe(self) -> str:
        then = (
            "the job ends before the stop, and this app keeps running here"
            if self.over == protocol.OverBudget.STOP
            else "the job goes on, and says the budget will be missed"
        )
        return f"downtime budget: {self.seconds:g} s; if the helper predicts more before the stop, {then}"


@dataclass
class Plan:
    """What a job will do, as pre-flight found it: what is copied, where, how long it should
    take and how long the app is down, and what is destroyed (the confirmation shows it)."""

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
    bwlimit_kbps: int | None = None
    budget: DowntimeBudget | None = None
    refresh: Snapshot | None = None  # the snapshot copy a refresh writes into
    image_refs: list = field(default_factory=list)  # the images the app's components run
    images: list = field(default_factory=list)  # of those, the ones the target lacks: copied first

    @property
    def source(self):
        return f"{self.source_grid.name}/{self.source_app}"

    @property
    def target(self):
        return f"{self.target_grid.name}/{self.target_app}"

    @property
    def estimated_seconds(self) -> float:
        """The whole job: copy and hashing while the app runs, then the downtime."""
        rate = MigrationJob.objects.measured_copy_rate() or DEFAULT_RATE
        if self.bwlimit_kbps:
            rate = min(rate, self.bwlimit_kbps * 1024)
        return PROVISION_SECONDS + self.bytes / rate + self.bytes / HASH_RATE + self.estimated_downtime

    @property
    def estimated_downtime(self) -> float:
        """From the stop to the first answer: as the last job measured it, or per entry."""
        measured = MigrationJob.objects.measured_downtime()
        return measured if measured is not None else FIXED_DOWNTIME + self.files * DOWNTIME_PER_FILE

    @property
    def destroys(self) -> list[str]:
        """What the job removes, as the confirmation must say it."""
        gone = []
        if self.refresh is not None:
            gone.append(
                f"what {self.target} holds that this app no longer has: the copy taken "
                f"{self.refresh.taken:%Y-%m-%d %H:%M} UTC is brought up to date (only the changes move)"
            )
        if self.stale_helper:
            gone.append(f"{self.helper} on {self.target_grid.name}, left by an earlier job, before it starts")
        if self.action == MigrationJob.Action.MIGRATE:
            gone.append(
                f"the source app {self.source} with its volumes ({human_bytes(self.bytes)}), once "
                f"{self.target} runs and has answered"
            )
        gone.append(f"the helper {self.helper} on {self.target_grid.name}, when the job ends")
        return gone

    def describe(self):
        """The plan in lines, as `migrate_app` prints it and the confirmation shows it."""
        downtime = self.estimated_downtime
        stop = (
            f"this app stops for about {downtime:.0f} s, then runs on {self.target}"
            if self.action == MigrationJob.Action.MIGRATE
            else f"this app stops for about {downtime:.0f} s for the final pass, then runs again here; "
            f"the copy {self.target} stays stopped"
        )
        lines = [
            f"{self.action} {self.source} → {self.target}",
            f"helper: {self.helper} on {self.target_grid.name}",
        ]
        for v in self.volumes:
            lines.append(f"  volume {v.name:<16} {human_bytes(v.bytes or 0):>12}  {v.files or 0} files")
        for image in self.images:
            size = human_bytes(image.size)
            lines.append(f"  image  {image.ref:<17} {size:>12}  copied to {self.target_grid.name} first")
        lines += [
            f"total {human_bytes(self.bytes)} in {self.files} files; "
            f"{human_bytes(self.target_free)} free on {self.target_grid.name}",
            f"expected: about {duration_words(self.estimated_seconds)} in all; {stop}",
            *([self.budget.describe()] if self.budget else []),
            *(f"destroys: {what}" for what in self.destroys),
        ]
        return "\n".join(lines)

    def to_dict(self):
        return {
            "volumes": [{"name": v.name, "bytes": v.bytes, "files": v.files} for v in self.volumes],
            "bytes": self.bytes,
            "files": self.files,
            "target_free": self.target_free,
            "images": [{"ref": i.ref, "bytes": i.size} for i in self.images],
            "estimated_seconds": round(self.estimated_seconds, 1),
            "estimated_downtime": round(self.estimated_downtime, 1),
            "max_downtime": self.budget.seconds if self.budget else None,
        }


def duration_words(seconds):
    """12 -> "12 s"; 150 -> "3 min"; 5400 -> "1 h 30 min"."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"


# --- pre-flight --------------------------------------------------------------------------


def preflight(target_grid_name, target_app, action, bwlimit_kbps=None, refresh=None, budget=None):
    """Check a job before it starts; raises PreflightError naming the field at fault.
    `refresh`: the Snapshot this snapshot job is to bring up to date; `budget`: the
    DowntimeBudget, if the operator set one."""
    if action not in allowed_actions():
        raise PreflightError(f"MIG_MODE={settings.MIG_MODE} does not allow {action}", "action")
    try:
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
    if source_grid.driver != target_grid.driver:
        raise PreflightError(
            f"{source_grid.name} is a {source_grid.driver} grid and {target_grid.name} a "
            f"{target_grid.driver} grid: an app moves only between grids of one kind (its "
            "components are processes on one, containers on the other)",
            "target_grid",
        )
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
    if (
        source_grid.driver == "docker"
        and "local" == source_grid.transport == target_grid.transport
        and source_grid.docker_socket != target_grid.docker_socket
    ):
        raise PreflightError(
            f"the helper runs in {target_grid.name}'s engine and cannot reach {source_grid.name}'s, "
            f"which is local to MIG: give {source_grid.name} an ssh transport in grid.info, or put "
            "both grids on one engine",
            "target_grid",
        )
    if "ssh" in (source_grid.transport, target_grid.transport):
        try:
            load_private_key(settings.MIG_PRIVATE_KEY_FILE)
        except GridError as e:
            raise PreflightError(str(e)) from None

    if refresh is not None and (action, target_grid_name, target_app) != (
        "snapshot",
        refresh.grid,
        refresh.app,
    ):
        raise PreflightError(f"a refresh is a snapshot into {refresh.name} itself")
    plan = Plan(
        action,
        source_grid,
        here_app,
        target_grid,
        target_app,
        helper,
        bwlimit_kbps=bwlimit_kbps,
        budget=budget,
        refresh=refresh,
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        source_check = pool.submit(check_source, plan)
        target_check = pool.submit(check_target, plan)
        # Target problems concern what the operator typed: report them first.
        target_check.result()
        source_check.result()
    check_images(plan)
    headroom = headroom_for(plan.bytes)
    # A refresh writes over what the copy holds: it needs room only for what grew.
    needed = max(plan.bytes - (refresh.bytes if refresh else 0), 0) + sum(i.size for i in plan.images)
    if plan.target_free < needed + headroom:
        raise PreflightError(
            f"not enough space on {target_grid.name}: the copy needs {human_bytes(needed + headroom)} "
            f"({human_bytes(needed)} of data and {human_bytes(headroom)} of headroom for the app to "
            f"go on writing), {human_bytes(plan.target_free)} is free",
            "target_grid",
        )
    return plan


def headroom_for(data_bytes):
    """Free space a target needs beyond the data: a tenth more, and at least SPACE_MARGIN."""
    return max(data_bytes // 10, SPACE_MARGIN)


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
    plan.image_refs = images_of(app.manifest)


def check_images(plan):
    """The images the app runs that the target grid lacks (by ID): the job copies them
    before anything else."""
    if not plan.image_refs:
        return
    try:
        with config.driver_for(plan.source_grid) as source, config.driver_for(plan.target_grid) as target:
            plan.images = missing_images(plan.image_refs, source, target)
    except GridError as e:
        raise PreflightError(f"the app's images: {e}") from None


def missing_images(refs, source, target):
    """The source's images of `refs` that the target has not, or has as another image."""
    theirs, ours = source.images(refs), target.images(refs)
    for ref, image in theirs.items():
        if image.id is None:
            raise GridError(f"the image {ref}, which the app runs, is not on {source.grid.name}")
    return [theirs[ref] for ref in refs if ours[ref].id != theirs[ref].id]


def check_target(plan):
    name = plan.target_grid.name
    try:
        with config.driver_for(plan.target_grid) as target:
            info = target.info()
            if problem := info.problem(plan.target_grid):
                raise PreflightError(f"{name}: {problem[1]}", "target_grid")
            apps = {a.name: a.state for a in target.list_apps()}
            copy = (
                target.describe(plan.target_app, sizes=False)
                if plan.refresh and plan.target_app in apps
                else None
            )
    except HostKeyError as e:
        raise PreflightError(f"{name}: {e}", "target_grid") from None
    except (TransportError, GridError) as e:
        raise PreflightError(f"{name} cannot be reached: {e}", "target_grid") from None
    if plan.refresh is not None:
        check_snapshot_copy(plan, copy)
    elif plan.target_app in apps:
        raise PreflightError(f"an app named {plan.target_app} already exists on {name}", "target_app")
    helper_state = apps.get(plan.helper)
    if helper_state in UP:
        raise PreflightError(
            f"{plan.helper} is already running on {name}: another job is copying to this name",
            "target_app",
        )
    plan.stale_helper = helper_state is not None
    plan.target_free = info.free_bytes or 0


def check_snapshot_copy(plan, copy):
    """A refresh writes into the snapshot copy this app made, stopped, and nothing else."""
    where = plan.target
    if copy is None:
        raise PreflightError(f"the snapshot copy {where} is gone: delete it from the list", "target_app")
    if copy.manifest.get("owner") != plan.refresh.owner:
        raise PreflightError(
            f"{where} is not the snapshot copy this app made: it is left alone", "target_app"
        )
    if copy.state != AppState.STOPPED:
        raise PreflightError(
            f"the snapshot copy {where} is {copy.state}: stop it first to refresh it", "target_app"
        )


# --- launch ------------------------------------------------------------------------------


def acquire(plan, started_by):
    """Take the lock and create the job for `plan`. Raises LockHeld."""
    lock = Lock.acquire(
        action=plan.action,
        source_grid=plan.source_grid.name,
        source_app=plan.source_app,
        target_grid=plan.target_grid.name,
        target_app=plan.target_app,
        helper_app=plan.helper,
        started_by=started_by,
        bwlimit_kbps=plan.bwlimit_kbps,
        max_downtime=plan.budget.seconds if plan.budget else None,
        over_budget=plan.budget.over if plan.budget else protocol.OverBudget.STOP,
        bytes_total=plan.bytes,
        refresh_of=plan.refresh,
        status_token=secrets.token_urlsafe(32),
    )
    job = lock.job
    job.event(f"Pre-flight passed: {human_bytes(plan.bytes)} in {plan.files} files", data=plan.to_dict())
    return job


def provision(job):
    """Copy the images the target grid lacks, define the target, then provision the job's
    helper on the target grid, reaching it. Raises LaunchError, ending the job."""
    job.set_state(MigrationJob.State.PROVISIONING)
    try:
        target_grid = config.grid_config(job.target_grid)
        with (
            config.driver_for(config.grid_config(job.source_grid)) as source,
            config.driver_for(target_grid) as target,
        ):
            try:
                copy_images(job, source, target)
                define_target(job, source, target)
                provision_helper(job, target)
            except (GridError, OSError) as e:
                job.event(f"could not provision the helper: {e}", level="error")
                destroy_helper(job, target)
                if job.target_created:
                    remove_target(job, target)
                raise
    except (GridError, ConfigError, OSError) as e:
        failure = job.failure_from(f"could not provision the helper: {e}")
        job.end(MigrationJob.State.FAILED, failure)
        raise LaunchError(f"{failure.summary} ({failure.detail})") from None
    return job


def copy_images(job, source, target):
    """The images the app runs, onto the target grid where it lacks them, checked by ID."""
    refs = source.app_images(job.source_app)
    for image in missing_images(refs, source, target) if refs else []:
        job.event(f"Copying the image {image.ref} ({human_bytes(image.size)}) to {job.target_grid}")
        pipe_image(source.open_image_export(image.ref), target.open_image_import(), image.ref)
        arrived = target.images([image.ref])[image.ref]
        if arrived.id != image.id:
            raise GridError(
                f"the image {image.ref} arrived on {job.target_grid} as {arrived.id}, not {image.id}"
            )
        job.event(f"The image {image.ref} is on {job.target_grid} ({image.id[:19]})")


def pipe_image(export, load, ref):
    """Stream an image archive from one grid's process to another's."""
    try:
        while chunk := export.stdout.read(1 << 20):
            load.stdin.write(chunk)
        load.stdin.close()
    except OSError:
        pass  # the loader ended early: its status says why
    failed = [
        f"{what} (status {proc.returncode}): {proc.stderr.read().decode('utf-8', 'replace').strip()[-300:]}"
        for what, proc in (("saving it", export), ("loading it", load))
        if proc.wait() != 0
    ]
    if failed:
        raise GridError(f"copying the image {ref} failed: " + "; ".join(failed))


def define_target(job, source, target):
    """The target app, stopped and empty, owned by the job, defined before the helper: the
    helper is provisioned to reach its volumes (on a docker grid they are mounted into the
    helper's container). Recorded before it exists, so that clean-up knows it may be there.
    A refresh writes into its snapshot copy instead."""
    if job.refresh_of is not None:
        return
    manifest = source.describe(job.source_app, sizes=False).manifest
    MigrationJob.objects.filter(pk=job.pk).update(target_created=True)
    job.target_created = True
    try:
        target.define(job.target_app, manifest, owner=job.owner_tag)
    except AppExists:
        # Clean-up removes only what this job owns: another's app is safe either way.
        if target.describe(job.target_app, sizes=False).manifest.get("owner") != job.owner_tag:
            raise GridError(
                f"an app named {job.target_app} appeared on {job.target_grid} meanwhile"
            ) from None
    job.event(f"Defined {job.target_app} on {job.target_grid} for the copy (stopped, empty)")


def helper_config(job):
    grids = config.grid_configs()
    source, target = grids[job.source_grid], grids[job.target_grid]
    return {
        "job": job.pk,
        "job_uid": job.uid,
        "action": job.action,
        # Where this MIG answers: the monitor's page comes from there.
        "source": {
            "grid": source.name,
            "app": job.source_app,
            "table": source.to_table(),
            "url": settings.MIG_APP_URL,
        },
        "target": {"grid": target.name, "app": job.target_app, "table": target.to_table()},
        "bwlimit_kbps": job.bwlimit_kbps,
        "max_downtime": job.max_downtime,
        "over_budget": job.over_budget,
        "recent_timings": MigrationJob.objects.measured_timings(),
        "stall_timeout": settings.MIG_STALL_TIMEOUT,
        "heartbeat_timeout": settings.MIG_HEARTBEAT_TIMEOUT,
        "freeze_after": settings.MIG_HELPER_FREEZE_AFTER,
        "bytes_total": job.bytes_total,
        "refresh_owner": job.refresh_of.owner if job.refresh_of else "",
    }


def provision_helper(job, target):
    if target.exists(job.helper_app):
        target.destroy(job.helper_app)  # any job's: pre-flight found no helper at work
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
    target.provision(
        job.helper_app, protocol.TEMPLATE, secrets=secrets_, owner=job.owner_tag, reaches=job.target_app
    )
    job.event(f"Provisioned {job.helper_app} on {job.target_grid}")
    # A busy host takes its time to start an interpreter: wait for the endpoint, or for the
    # helper to fail, not for a fixed while. A look is two round trips to the grid's agent,
    # and the helper is up in about 0.2 s: looking often ends the wait soon after it is.
    deadline = time.monotonic() + HELPER_START_TIMEOUT
    while time.monotonic() < deadline:
        text, _ = target.read_file(job.helper_app, protocol.STATUS_FILE)
        if text:
            job.status_url = json.loads(text)["url"]
            job.save(update_fields=["status_url", "updated"])
            return
        if (state := target.state(job.helper_app)) not in UP:
            raise GridError(f"{job.helper_app} is {state} before it started its status endpoint")
        time.sleep(0.02)
    raise GridError(f"{job.helper_app} did not start its status endpoint in {HELPER_START_TIMEOUT:g}s")


def spawn_manage(*args, new_log=False, log=True, yielding=False):
    """Run `manage.py ARGS` in the background, logging to the config volume's migration.log
    (or, with log=False, to this process's own output). `yielding`: at a lower CPU
    priority (nice 10, where `nice` is installed), for work that must not slow down what
    runs beside it.

    The process stays in MIG's own session: when the helper stops this app, it stops with
    it, and never writes to the database while the final copy is taken.
    """
    # One log per migration, overwritten by the next, as in the original.
    log_path = settings.CONFIG_DIR / "logs" / "migration.log"
    if log:
        log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "w" if new_log else "a") if log else nullcontext(None) as out:
        nice = shutil.which("nice") if yielding else None
        command = [sys.executable, str(settings.BASE_DIR / "manage.py"), *args]
        proc = subprocess.Popen(
            [nice, "-n", "10", *command] if nice else command,
            cwd=settings.BASE_DIR,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log else None,
            # Its lines reach the log as they are written, not when a buffer fills.
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    # Reap it when it ends, so a long-lived web worker collects no zombies.
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def start_runner(job, new_log=False):
    """Run the job in the background (`run_job`): provision its helper if that is still to
    do, then follow it while MIG runs."""
    return spawn_manage("run_job", str(job.pk), new_log=new_log)


class CancelError(Exception):
    """The job cannot be cancelled (any more); the message says why."""


COMMITTED_SAYS = (
    "the cut-over is committed: the copy was verified and is the app now, so cancelling would lose its writes"
)


def cancel(job, by) -> str:
    """Ask for `job` to be cancelled. Before its commit it rolls back as a failure does: the
    helper restarts the source and removes what the job created, and the job ends
    cancelled. After the commit the helper refuses, and says why in the job's log.

    The request travels as a file in the helper's work volume; before the helper exists it
    waits in the job (the runner passes it on). Nothing else is written to MIG's database:
    from "hands off" on, the final pass copies it. Returns what happens next; raises
    CancelError when there is nothing to cancel or it is too late."""
    job.refresh_from_db()
    if not job.is_active:
        raise CancelError(f"job #{job.pk} has ended ({job.get_state_display().lower()}): nothing to cancel")
    if job.state in (MigrationJob.State.STARTING, MigrationJob.State.FINISHING) or config.here() == (
        job.target_grid,
        job.target_app,
    ):
        raise CancelError(f"job #{job.pk} cannot be cancelled: {COMMITTED_SAYS}")
    if job.state == MigrationJob.State.ROLLING_BACK:
        raise CancelError(f"job #{job.pk} is rolling back already: the source app will run again")
    if job.state in (MigrationJob.State.PENDING, MigrationJob.State.PROVISIONING):
        MigrationJob.objects.filter(pk=job.pk, cancel={}).update(cancel={"by": by})
        job.event(f"Cancel requested by {by}: the helper is told as soon as it is provisioned")
    try:
        send_cancel(job, by)
    except AppNotFound:
        pass  # not provisioned yet: the runner passes the request on
    except (GridError, ConfigError) as e:
        raise CancelError(f"job #{job.pk}: the helper on {job.target_grid} cannot be told: {e}") from None
    return (
        f"Cancel requested for job #{job.pk}: the helper rolls back at its next step (the source app runs "
        "again, what the job created is removed), unless the cut-over was committed meanwhile."
    )


def send_cancel(job, by):
    """Write the cancel request into the helper's work volume. Raises AppNotFound."""
    with config.driver_for(config.grid_config(job.target_grid)) as target:
        target.state(job.helper_app)
        target.put_file(job.helper_app, protocol.CANCEL_FILE, json.dumps({"by": by}).encode(), 0o644)


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


def this_process():
    """This process as a runner of a job: "pid start-time" (a pid alone may be reused)."""
    info = proc_stat(os.getpid())
    return f"{os.getpid()} {info[2] if info else 0}"


def process_alive(runner):
    pid, start_time = runner.split()
    return pid_alive(int(pid), start_time if start_time != "0" else None)


# --- running a job while MIG runs --------------------------------------------------------


class Outcome(enum.StrEnum):
    """What running or completing a job came to."""

    DONE = "done"  # the job ended well
    FAILED = "failed"  # the job ended and failed; the source runs
    CANCELLED = "cancelled"  # an operator cancelled the job; rolled back, the source runs
    CLEARED = "cleared"  # a snapshot copy started by hand cleared its stale lock
    FOLLOWING = "following"  # the helper is still at work: run_job follows it
    HANDED_OVER = "handed over"  # the source stops; the side that comes up finishes the job
    RETRY = "retry"  # a grid could not be reached: the running MIG tries again
    HELD = "held"  # only an operator can move the job on; job.attention says how


# Backoff for a follower that lost the helper, and for a finish that could not reach a grid.
RETRY_DELAYS = (1, 2, 4, 8, 16, 30, 60, 120, 300)
# A target grid unreachable this long before the stop: the operator should know.
UNREACHABLE_HOLD = 600
UNREACHABLE_SAYS = "has been unreachable"


class RunnerBusy(Exception):
    pass


class Runner:
    """Runs a job while MIG runs (`run_job`): provisions the helper, then mirrors its
    journal into the job.

    Once the helper says hands off (before it hashes, then stops, the source), the runner
    writes nothing more to the database: the final pass copies it, and must find it still.
    Once the source has stopped, there is nothing left for this MIG to do: the side that
    comes up finishes the job (HANDED_OVER), unless `watch` (a terminal) asks to go on
    showing progress until the helper's result. Not before: a helper may announce the stop
    and die before it happens. If the helper ends without having stopped the source, MIG
    runs on here, and the runner completes the job. A lost connection to the target grid is
    retried with backoff for as long as it takes.
    """

    def __init__(self, job, on_line=None, watch=False, on_hands_off=None):
        self.job = job
        self.on_line = on_line or (lambda line: None)
        self.on_hands_off = on_hands_off or (lambda: None)
        self.watch = watch
        self.write_db = True
        self.source_stopped = False
        self.result = self.error = None

    def run(self) -> Outcome:
        job = self.job
        if not job.claim_runner(this_process(), process_alive):
            raise RunnerBusy(f"job {job.pk} is run by another process (pid {job.runner.split()[0]})")
        if job.state == MigrationJob.State.PENDING:
            try:
                provision(job)
            except LaunchError:
                return Outcome.FAILED
            job.refresh_from_db()
            if by := job.cancel.get("by"):
                try:
                    send_cancel(job, by)  # asked for while the helper was being provisioned
                except GridError as e:
                    job.event(
                        f"The cancel could not be passed on to the helper: {e}; cancel again", level="warning"
                    )
        return self.follow()

    def follow(self) -> Outcome:
        job = self.job
        target_config = config.grid_config(job.target_grid)
        seen = job.events.filter(seq__isnull=False).aggregate(models.Max("seq"))["seq__max"] or 0
        unreachable_since = None
        for delay in itertools.chain(RETRY_DELAYS, itertools.repeat(RETRY_DELAYS[-1])):
            try:
                with config.driver_for(target_config) as target:
                    for raw in target.follow(job.helper_app, protocol.PROGRESS_FILE):
                        if unreachable_since is not None:
                            self.found_again()
                        unreachable_since = None
                        lines = parse_lines(raw)
                        if not lines or lines[0]["seq"] <= seen:
                            continue
                        seen = lines[0]["seq"]
                        if outcome := self.take(lines[0], target):
                            return outcome
                break  # the helper stopped running
            except AppNotFound:
                break
            except GridError as e:
                first = unreachable_since is None
                unreachable_since = unreachable_since or time.monotonic()
                self.lost(e, delay, time.monotonic() - unreachable_since, first)
                time.sleep(delay)
        if not self.source_stopped:
            # MIG still runs, so this is the source: the helper failed, or is gone.
            self.write_db = True
            return complete(job, wait=0)
        return Outcome.HANDED_OVER

    def take(self, line, target):
        """Mirror one journal line; returns an Outcome once there is nothing left to follow."""
        job = self.job
        if self.write_db:
            job.apply_helper_lines([line])
            # Hold no database connection between writes: it must not be open (or be the
            # one to checkpoint) while the helper copies the file.
            db.connection.close()
        if self.write_db or self.watch:
            # In the background, its output is a log on the config volume: it goes quiet too.
            self.on_line(line)
        fact = line.get("fact")
        if fact == protocol.HANDS_OFF and self.write_db:
            self.write_db = False
            self.on_hands_off()
            # Every line before it is filed: the helper may hash the source's volumes now.
            target.put_file(job.helper_app, protocol.HANDS_OFF_ACK_FILE, b"MIG writes nothing more\n", 0o644)
        if fact == protocol.SOURCE_STOPPED:
            self.source_stopped = True
            if not self.watch:
                return Outcome.HANDED_OVER
        if fact == protocol.RESULT:
            self.result, self.error = protocol.Result(line["result"]), line.get("error", "")
            if self.source_stopped:
                return {protocol.Result.OK: Outcome.DONE, protocol.Result.CANCELLED: Outcome.CANCELLED}.get(
                    self.result, Outcome.FAILED
                )
            # The source never stopped, so the copy is over: this MIG may write again.
            self.write_db = True
            return complete(job, wait=0)
        return None

    def found_again(self):
        """The target grid answers again: a hold for its silence no longer stands."""
        if self.write_db and UNREACHABLE_SAYS in self.job.attention:
            self.job.unhold(f"{self.job.target_grid} answers again: following the helper")
            db.connection.close()

    def lost(self, error, delay, seconds, first):
        if not (self.write_db or self.watch):
            return  # hands off: its log is on the source's volumes
        message = f"Lost the helper's progress: {error}; trying again in {delay}s"
        log.warning("job %s: %s", self.job.pk, message)
        line = {"kind": protocol.EVENT, "level": "warning", "phase": self.job.state, "message": message}
        self.on_line(line)
        if self.write_db and first:
            self.job.event(message, level=JobEvent.Level.WARNING)
            db.connection.close()
        if self.write_db and seconds >= UNREACHABLE_HOLD:
            self.job.hold(
                f"{self.job.target_grid} {UNREACHABLE_SAYS} for {seconds / 60:.0f} min and the helper "
                "may still be at work; MIG keeps trying. If the grid is gone for good, override the "
                "lock: the source app was not touched."
            )
            db.connection.close()


# --- completion: the startup decision table ---------------------------------------------


@dataclass
class Facts:
    """What the grids say about a job, read once for the startup table."""

    helper: AppState | None  # the helper app's state; None once it is gone
    journal: Summary  # the helper's journal, as filed into the job
    cutover: Cutover | None  # the record on the source grid; None if none (or no source)
    source: AppState | None  # the source app's state; None once it is gone

    @property
    def helper_at_work(self):
        undecided = self.cutover is None or self.cutover.decision is None
        return undecided and self.journal.result is None and self.helper in UP

    @property
    def committed(self):
        """The cut-over committed: by its record, or, once the record went with the source
        app, by the helper's journal."""
        if self.cutover is not None:
            return self.cutover.decision == Decision.COMMIT and not self.cutover.abandoned
        return self.journal.decision == Decision.COMMIT or self.journal.result == protocol.Result.OK


def state_or_none(driver, app):
    try:
        return driver.state(app)
    except AppNotFound:
        return None


def file_helper_log(job, target, wait):
    """File the helper's journal into the job's events; wait up to `wait` s for its result.

    Returns the helper app's state, or None if it no longer exists.
    """
    deadline = time.monotonic() + wait
    while True:
        state = state_or_none(target, job.helper_app)
        if state is not None:
            text, _ = target.read_file(job.helper_app, protocol.PROGRESS_FILE)
            job.apply_helper_lines(parse_lines(text))
        if job.helper_summary().result or state not in UP:
            return state
        if time.monotonic() >= deadline:
            return state
        time.sleep(0.3)


def complete(job, wait=None, here=None) -> Outcome:
    """Finish or clean up `job` from wherever this MIG runs (docs/DESIGN.md's startup table),
    deciding from facts: the cut-over record on the source grid and the helper's journal.
    Every row is idempotent."""
    wait = settings.MIG_HELPER_WAIT if wait is None else wait
    here = here or config.here()
    source = (job.source_grid, job.source_app)
    target = (job.target_grid, job.target_app)
    if here == target and job.action == MigrationJob.Action.SNAPSHOT:
        return clear_snapshot_copy(job)
    if here not in (source, target):
        job.hold(
            f"This MIG runs in {here[0]}/{here[1]}, neither the source nor the target of job #{job.pk}: "
            "it leaves the lock for an operator (override it on the lock page if this copy is to go on)."
        )
        return Outcome.HELD
    try:
        with (
            config.driver_for(config.grid_config(job.target_grid)) as target_driver,
            config.driver_for(config.grid_config(job.source_grid)) as source_driver,
        ):
            helper = file_helper_log(job, target_driver, wait)
            source_state = state_or_none(source_driver, job.source_app)
            record = source_driver.read_cutover(job.source_app) if source_state is not None else None
            record = record if record and record.job == job.uid else None
            facts = Facts(helper, job.helper_summary(), record, source_state)
            if here == source:
                return complete_on_source(job, facts, source_driver, target_driver)
            return complete_on_target(job, facts, source_driver, target_driver)
    except (GridError, ConfigError) as e:
        job.event(f"Could not finish the job now: {e}; MIG tries again", level="warning")
        return Outcome.RETRY


def complete_on_source(job, facts, source, target):
    if facts.helper_at_work:
        # Only MIG restarted while the helper works on: keep following it.
        return Outcome.FOLLOWING
    if facts.cutover is not None and facts.cutover.decision is None:
        # Armed, undecided, and no helper at work: this MIG runs, so the source stays the
        # app. Decided here, before anything is cleared: the watchdog needs the record.
        facts.cutover = source.claim_cutover(
            job.source_app, job.uid, Decision.ROLLBACK, "MIG", "the helper was gone before the decision"
        )
    if facts.cutover is not None and facts.cutover.source_may_run and facts.source not in UP:
        source.start(job.source_app, listen=True)
        job.event(f"Started the source app {job.source_app} again")
    if facts.cutover is not None and facts.cutover.moved:
        job.hold(
            f"Job #{job.pk} committed the move to {job.target_grid}/{job.target_app}, yet the source app "
            f"{job.source_app} runs here: both copies may take writes. Stop the one that must not run, "
            "then override the lock on the copy that goes on."
        )
        return Outcome.HELD
    snapshot_kept = facts.committed or facts.journal.result == protocol.Result.OK
    if job.action == MigrationJob.Action.SNAPSHOT and snapshot_kept:
        destroy_helper(job, target)
        source.clear_cutover(job.source_app, job.uid)
        record_downtime(job, facts)
        job.event(f"Snapshot complete; destroyed {job.helper_app}; source back up")
        job.end(MigrationJob.State.DONE)
        return Outcome.DONE
    return clean_up_failure(job, facts, source, target)


def failure_of(job, facts) -> protocol.Failure:
    """Why the job failed, from the helper's own words if it left them."""
    journal = facts.journal
    if failure := journal.failure:
        return failure
    phase = journal.phase if journal.phase in protocol.PHASES else job.state
    label = protocol.LABELS.get(phase, phase.capitalize())
    if facts.cutover is not None and facts.cutover.decision == Decision.ROLLBACK:
        return protocol.Failure(
            f"{label} failed: the cut-over was rolled back by the {facts.cutover.decided_by} "
            f"({facts.cutover.reason}); the source app runs.",
            protocol.Cause.LOST if facts.cutover.decided_by != "helper" else protocol.Cause.OTHER,
            phase,
        )
    detail = f"the helper's last message: {journal.latest.get('message')}" if journal.latest else ""
    gone = "disappeared" if facts.helper is None else "stopped"
    return protocol.Failure(
        f"{label} failed: the helper {gone} before it reported a result; see its log on {job.target_grid}.",
        protocol.Cause.LOST,
        phase,
        detail,
    )


def clean_up_failure(job, facts, source, target):
    """The job failed or was cancelled: remove the helper and any target this job created;
    the source runs."""
    failure = failure_of(job, facts)
    cancelled = facts.journal.result == protocol.Result.CANCELLED
    if job.target_created:
        remove_target(job, target)
    destroy_helper(job, target)
    source.clear_cutover(job.source_app, job.uid)
    record_downtime(job, facts)
    job.event(
        f"Destroyed {job.helper_app}; the source app runs. "
        + ("The job was cancelled." if cancelled else "The job failed."),
        level="warning" if cancelled else "error",
    )
    if cancelled:
        job.end(MigrationJob.State.CANCELLED, failure)
        return Outcome.CANCELLED
    job.end(MigrationJob.State.FAILED, failure)
    return Outcome.FAILED


def destroy_helper(job, target):
    """Remove this job's helper, and only this job's: a late clean-up of an ended job (two
    processes may finish one job) must not remove the next job's helper of the same name."""
    target.destroy(job.helper_app, owner=job.owner_tag)


def remove_target(job, target):
    """Remove the target this job created, unless it runs (never removed automatically)."""
    state = state_or_none(target, job.target_app)
    if state is None:
        return
    if state in UP:
        job.event(f"{job.target_app} is running on {job.target_grid}: not removing it", level="warning")
        return
    if target.destroy(job.target_app, owner=job.owner_tag).get("kept"):
        job.event(f"{job.target_app} on {job.target_grid} is not this job's: left as it is", level="warning")
    else:
        job.event(f"Removed the partial target {job.target_app} on {job.target_grid}")


def complete_on_target(job, facts, source, target):
    """The migrated app came up here: remove the helper and the source, and finish."""
    if not facts.committed:
        said = f"its cut-over is {facts.cutover.decision or 'undecided'}" if facts.cutover else "no decision"
        job.hold(
            f"This copy runs, but job #{job.pk} did not commit its move ({said}): leaving everything as "
            f"it is. If this copy is to be the app, stop {job.source_grid}/{job.source_app} if it runs "
            "and override the lock; otherwise stop this copy."
        )
        return Outcome.HELD
    if facts.source in UP:
        job.hold(
            f"The source app {job.source_app} is running again on {job.source_grid} although the move "
            "committed: both copies may take writes. Stop the one that must not run, then override the lock."
        )
        return Outcome.HELD
    destroy_helper(job, target)
    if facts.source is not None:
        source.destroy(job.source_app)
        job.event(f"Destroyed the source app {job.source_app} on {job.source_grid}")
    record_downtime(job, facts)
    job.event(f"Migration complete: {job.target_app} runs on {job.target_grid}")
    job.end(MigrationJob.State.DONE)
    return Outcome.DONE


def record_downtime(job, facts):
    """The downtime the helper measured, to the app's first answer; MIG's own start, if the
    helper could not measure it, is the next best thing."""
    if downtime := facts.journal.downtime():
        job.record_downtime(downtime)
    elif job.source_stopped and job.app_up is None:
        MigrationJob.objects.filter(pk=job.pk, app_up__isnull=True).update(app_up=timezone.now())
        job.refresh_from_db()


def clear_snapshot_copy(job):
    job.event(
        "This is the snapshot copy, started by hand: nothing to do on any grid; clearing the "
        "lock that was copied with it"
    )
    job.end(MigrationJob.State.DONE)
    return Outcome.CLEARED


# --- recovery: an operator carries out the cut-over's decision -------------------------


class RecoverError(Exception):
    pass


def recover(job, give_up_target=False, by="operator"):
    """Carry out what the cut-over record decided for a job no helper finishes any more,
    deciding rollback if nothing was decided. Returns what was done, line by line. The MIG
    of the app that runs then ends the job: when it starts (startup table), or now, if it
    already ran and this is it."""
    done = []
    with (
        config.driver_for(config.grid_config(job.target_grid)) as target,
        config.driver_for(config.grid_config(job.source_grid)) as source,
    ):
        helper = file_helper_log(job, target, 0)
        journal = job.helper_summary()
        source_state = state_or_none(source, job.source_app)
        record = source.read_cutover(job.source_app) if source_state is not None else None
        record = record if record and record.job == job.uid else None
        if journal.result is None and helper in UP:
            alive = record is None or record.heartbeat_age is None or record.heartbeat_age < record.timeout
            if alive:
                raise RecoverError(
                    f"{job.helper_app} is still at work on {job.target_grid}: let it finish, or stop it first"
                )
        if record is not None and record.decision is None:
            reason = "the helper was gone before the cut-over was decided"
            record = source.claim_cutover(job.source_app, job.uid, Decision.ROLLBACK, by, reason)
            done.append(f"decided the cut-over: {record.decision} (by the {record.decided_by})")
        if record is not None and record.moved and give_up_target:
            if state_or_none(target, job.target_app) in UP or journal.has(protocol.APP_STARTED):
                raise RecoverError(
                    f"{job.target_grid}/{job.target_app} has started, so it may have taken writes: it is "
                    "not given up automatically; stop it by hand if it must go, then override the lock"
                )
            record = source.abandon_cutover(job.source_app, job.uid, by, "given up by an operator (recover)")
            done.append(f"gave up {job.target_grid}/{job.target_app}, which never started")
        if record is not None and record.moved:
            runs, grid, app = (job.target_grid, job.target_app), target, job.target_app
        elif source_state is None:
            raise RecoverError(f"the source app {job.source_app} is gone from {job.source_grid}")
        else:
            if record is not None and record.abandoned:
                remove_target(job, target)
            runs, grid, app = (job.source_grid, job.source_app), source, job.source_app
        started = state_or_none(grid, app) != AppState.RUNNING
        if started:
            grid.start(app, listen=True)
            done.append(f"started {runs[0]}/{app}: its MIG finishes the job")
        if record is not None and not record.closed and not record.moved:
            source.close_cutover(job.source_app, job.uid)
    for line in done:
        job.event(f"Recover: {line}", level=JobEvent.Level.WARNING, data={"by": by})
    if not started and config.here() == runs:
        done.append(f"the job ends here: {complete(job, wait=0)}")
    return done
