import uuid
from datetime import UTC, datetime, timedelta

from django.db import IntegrityError, models, transaction
from django.db.models import F, Q
from django.utils import timezone

from .grids.gridinfo import GridConfig
from .helper import protocol
from .helper.progress import Summary


class GridQuerySet(models.QuerySet):
    def listed(self):
        return self.filter(in_grid_info=True)

    def record_check(self, name, ok, message="ok"):
        """Keep the result of checking a grid (grids command, pre-flight) for the form."""
        self.filter(name=name).update(checked_at=timezone.now(), check_ok=ok, check_message=message)

    def sync_from(self, configs: dict[str, GridConfig]):
        """Mirror grid.info into the table; returns (created, updated, unlisted) names.

        A grid that leaves grid.info is kept, marked unlisted: job history refers to it.
        """
        created, updated = [], []
        existing = {g.name: g for g in self.all()}
        for name, config in configs.items():
            fields = Grid.fields_from(config)
            grid = existing.get(name)
            if grid is None:
                self.create(name=name, **fields)
                created.append(name)
            elif any(getattr(grid, k) != v for k, v in fields.items()):
                self.filter(pk=grid.pk).update(**fields, updated=timezone.now())
                updated.append(name)
        gone = [n for n, g in existing.items() if g.in_grid_info and n not in configs]
        self.filter(name__in=gone).update(in_grid_info=False, updated=timezone.now())
        return created, updated, gone


class Grid(models.Model):
    """A grid as listed in grid.info, plus the result of its last check."""

    class Driver(models.TextChoices):
        HOSTGRID = "hostgrid"
        DOCKER = "docker"
        LIBVIRT = "libvirt"

    class Transport(models.TextChoices):
        LOCAL = "local"
        SSH = "ssh"

    name = models.CharField(max_length=64, unique=True)
    driver = models.CharField(max_length=16, choices=Driver.choices)
    transport = models.CharField(max_length=8, choices=Transport.choices)
    host = models.CharField(max_length=253, blank=True)
    port = models.PositiveIntegerField(default=22)
    user = models.CharField(max_length=32, blank=True)
    host_key = models.TextField(blank=True)
    root = models.CharField(max_length=4096)
    app_url = models.CharField(max_length=2048, blank=True)
    in_grid_info = models.BooleanField(
        default=True, help_text="False once the grid has left grid.info; kept for job history."
    )
    checked_at = models.DateTimeField(null=True, blank=True)
    check_ok = models.BooleanField(null=True)
    check_message = models.TextField(blank=True)
    updated = models.DateTimeField(auto_now=True)

    objects = GridQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    MIRRORED = ("driver", "transport", "host", "port", "user", "host_key", "root", "app_url")

    @classmethod
    def fields_from(cls, config: GridConfig):
        fields = {k: getattr(config, k) for k in cls.MIRRORED}
        fields["in_grid_info"] = True
        return fields


class JobQuerySet(models.QuerySet):
    def active(self):
        return self.filter(state__in=MigrationJob.ACTIVE_STATES)

    def finished(self):
        return self.exclude(state__in=MigrationJob.ACTIVE_STATES)


def new_uid():
    return uuid.uuid4().hex


class MigrationJob(models.Model):
    """One migration or snapshot attempt; kept forever as history.

    State transitions (the active states are the phases of docs/DESIGN.md, "The migration"):

        pending ─► provisioning ─► precopy ─► stopping ─► final_sync ─► verifying
            ─► starting ─► finishing ─► done

    - pending: the lock is taken, the job exists; `run_job` is about to provision the helper.
    - provisioning: `run_job` is giving the helper its files and provisioning it.
    - precopy … starting: reported by the helper as it works (MIG is down from stopping on).
    - finishing: the helper is done; `startup` on the side that came up completes the job.
    - done: `startup` saw the expected side come up and cleaned up.
    - failed: from any active state, with `error` saying why (a provisioning error, the
      helper's reason, the helper lost, a rollback of the cut-over).
    - overridden: from any active state, when an operator overrode the lock.

    A job ends with `end()`, which releases its lock in the same transaction. An active job
    whose `attention` is set is held: only an operator can move it on, and `attention` says
    what to do and which command does it.
    """

    class Action(models.TextChoices):
        MIGRATE = "migrate"
        SNAPSHOT = "snapshot"

    class State(models.TextChoices):
        PENDING = "pending"
        PROVISIONING = "provisioning"
        PRECOPY = "precopy", "Pre-copy"
        STOPPING = "stopping", "Stopping source"
        FINAL_SYNC = "final_sync", "Final sync"
        VERIFYING = "verifying"
        STARTING = "starting"
        FINISHING = "finishing"
        DONE = "done"
        FAILED = "failed"
        OVERRIDDEN = "overridden"

    # The phases the helper reports, in order.
    HELPER_PHASES = [
        State.PRECOPY,
        State.STOPPING,
        State.FINAL_SYNC,
        State.VERIFYING,
        State.STARTING,
        State.FINISHING,
    ]
    ACTIVE_STATES = [State.PENDING, State.PROVISIONING, *HELPER_PHASES]

    action = models.CharField(max_length=16, choices=Action.choices)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    source_grid = models.CharField(max_length=64)
    source_app = models.CharField(max_length=64)
    target_grid = models.CharField(max_length=64)
    target_app = models.CharField(max_length=64)
    helper_app = models.CharField(max_length=80, blank=True)
    started_by = models.CharField(max_length=150, blank=True)
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)
    finished = models.DateTimeField(null=True, blank=True)
    bytes_total = models.BigIntegerField(default=0)
    bytes_done = models.BigIntegerField(default=0)
    rate = models.FloatField(default=0, help_text="bytes per second in the current phase")
    eta_seconds = models.FloatField(null=True, blank=True)
    # When the helper began stopping the source: the app serves no one from then on.
    source_stopped = models.DateTimeField(null=True, blank=True)
    # When MIG answered again after the stop: on the target (migrate) or the source (snapshot).
    app_up = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    bwlimit_kbps = models.PositiveIntegerField(null=True, blank=True)
    # Read-only access to the helper's progress while MIG itself is down.
    status_url = models.CharField(max_length=2048, blank=True)
    status_token = models.CharField(max_length=64, blank=True)
    target_created = models.BooleanField(
        default=False,
        help_text="The helper was about to define the target app: clean-up removes it if this job owns it.",
    )
    # Names the job on the grids: its cut-over record, and the target app it owns.
    uid = models.CharField(max_length=32, default=new_uid, editable=False)
    attention = models.TextField(
        blank=True, help_text="Held: what an operator must do, and which command does it."
    )
    # The downtime and its parts, in seconds (see helper.progress.Downtime).
    timings = models.JSONField(default=dict, blank=True)
    # The run_job process that owns the job while MIG runs ("pid start-time"); see claim_runner.
    runner = models.CharField(max_length=64, blank=True)
    # The states of the source app, the helper and the target app, as last reported.
    apps = models.JSONField(default=dict, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.CheckConstraint(
                condition=~Q(source_grid=F("target_grid"), source_app=F("target_app")),
                name="job_target_differs_from_source",
            ),
            models.CheckConstraint(
                condition=Q(bytes_done__gte=0) & Q(bytes_total__gte=0),
                name="job_bytes_not_negative",
            ),
        ]
        indexes = [
            # JobQuerySet.active(), used by the lock page and the history filters.
            models.Index(fields=["state"], name="job_state_idx"),
            # The history list, newest first, filtered by action or grid.
            models.Index(fields=["action", "-created"], name="job_action_created_idx"),
            models.Index(fields=["target_grid", "-created"], name="job_target_grid_idx"),
            models.Index(fields=["source_grid", "-created"], name="job_source_grid_idx"),
        ]

    def __str__(self):
        return (
            f"#{self.pk} {self.action} {self.source_grid}/{self.source_app} → "
            f"{self.target_grid}/{self.target_app} ({self.state})"
        )

    @property
    def is_active(self):
        return self.state in self.ACTIVE_STATES

    @property
    def held(self):
        return self.is_active and bool(self.attention)

    @property
    def owner_tag(self):
        """How the grids know what this job created (see Driver.define)."""
        return f"mig-job:{self.uid}"

    @property
    def downtime(self) -> timedelta | None:
        if self.source_stopped and self.app_up:
            return self.app_up - self.source_stopped
        return None

    @property
    def duration(self) -> timedelta | None:
        return (self.finished - self.created) if self.finished else None

    def event(self, message, level="info", phase="", data=None, seq=None, at=None):
        return self.events.create(
            message=message,
            level=level,
            phase=phase or self.state,
            data=data or {},
            seq=seq,
            created=at or timezone.now(),
        )

    def set_state(self, state):
        """Move between active states; a finished job is never revived."""
        MigrationJob.objects.filter(pk=self.pk, state__in=self.ACTIVE_STATES).update(
            state=state, updated=timezone.now()
        )
        self.refresh_from_db()

    def apply_helper_lines(self, lines):
        """File the helper's events (each once) and take its latest counters and phase."""
        events = [
            JobEvent(
                job=self,
                seq=line["seq"],
                created=datetime.fromisoformat(line["time"]),
                level=line.get("level", JobEvent.Level.INFO),
                phase=line.get("phase", ""),
                message=line.get("message", ""),
                data=line,
            )
            for line in lines
            if line.get("kind") == protocol.EVENT
        ]
        JobEvent.objects.bulk_create(events, ignore_conflicts=True)
        updates = {}
        for line in lines:
            if line.get("phase") in self.HELPER_PHASES:
                updates["state"] = line["phase"]
            if line.get("kind") == protocol.PROGRESS:
                updates.update(
                    bytes_done=line["bytes_done"],
                    bytes_total=line["bytes_total"],
                    rate=line["rate"],
                    eta_seconds=line["eta"],
                )
            if line.get("fact") == protocol.SOURCE_STOPPING:
                updates["source_stopped"] = datetime.fromisoformat(line["time"])
            if line.get("fact") == protocol.APP_ANSWERED:
                updates["app_up"] = datetime.fromtimestamp(line["at"], UTC)
            if line.get("fact") == protocol.TARGET_DEFINING:
                updates["target_created"] = True
            if "apps" in line:
                updates["apps"] = line["apps"]
        if updates:
            updates["updated"] = timezone.now()
            MigrationJob.objects.filter(pk=self.pk, state__in=self.ACTIVE_STATES).update(**updates)
            self.refresh_from_db()

    def helper_summary(self):
        """What the helper has reported, from the events filed so far."""
        summary = Summary()
        for data in self.events.filter(seq__isnull=False).order_by("seq").values_list("data", flat=True):
            summary.add(data)
        return summary

    def end(self, state, reason=""):
        """End the job (done, failed or overridden) and release its lock, in one transaction,
        so that no reader ever sees an ended job holding the lock. Once: a job that ended
        stays as it was; returns whether this call ended it."""
        if state in self.ACTIVE_STATES:
            raise ValueError(f"a job ends as done, failed or overridden, not {state}")
        now = timezone.now()
        with transaction.atomic():
            changed = MigrationJob.objects.filter(pk=self.pk, state__in=self.ACTIVE_STATES).update(
                state=state,
                error=reason,
                finished=now,
                updated=now,
                eta_seconds=None,
                attention="",
                status_token="",  # the helper's status is nobody's business any more
            )
            Lock.objects.filter(job=self).delete()
        self.refresh_from_db()
        return bool(changed)

    def hold(self, attention):
        """Only an operator can move the job on: say what to do (recorded once); the lock stays."""
        if self.attention != attention:
            self.event(attention, level=JobEvent.Level.WARNING)
        MigrationJob.objects.filter(pk=self.pk, state__in=self.ACTIVE_STATES).update(
            attention=attention, updated=timezone.now()
        )
        self.refresh_from_db()

    def claim_runner(self, me, alive):
        """Take the job for the run_job process `me`; False if another one, alive by
        `alive(runner)`, has it. Two claiming at once: one update wins."""
        current = self.runner
        if current and current != me and alive(current):
            return False
        claimed = MigrationJob.objects.filter(pk=self.pk, runner=current).update(runner=me)
        self.refresh_from_db()
        return bool(claimed)

    def unhold(self, message):
        """What held the job is resolved: say so; the job goes on."""
        self.event(message)
        MigrationJob.objects.filter(pk=self.pk).update(attention="", updated=timezone.now())
        self.refresh_from_db()

    def record_downtime(self, downtime):
        """The downtime as the helper measured it, to the app's first answer (see Downtime)."""
        MigrationJob.objects.filter(pk=self.pk).update(timings=downtime.to_dict())
        self.refresh_from_db()

    def app_states(self):
        """The source app, the helper and the target app, as the monitor shows them."""
        if self.is_active:
            helper = "provisioning" if self.state == self.State.PROVISIONING else "not yet"
            return self.apps or {"source": "running", "helper": helper, "target": "absent"}
        if self.state == self.State.DONE and self.action == self.Action.MIGRATE:
            return {"source": "destroyed", "helper": "destroyed", "target": "running"}
        if self.state == self.State.DONE:
            return {"source": "running", "helper": "destroyed", "target": "stopped"}
        if self.state == self.State.FAILED:
            target = "removed" if self.target_created else "absent"
            return {"source": "running", "helper": "destroyed", "target": target}
        # Overridden: nothing was touched on any grid, so nothing is known.
        return {"source": "not checked", "helper": "not checked", "target": "not checked"}

    def override(self, by, reason):
        """An operator ends a stuck job: recorded, lock released, nothing touched on a grid."""
        self.event(f"Lock overridden by {by}: {reason}", level="warning", data={"by": by})
        self.end(self.State.OVERRIDDEN, f"overridden by {by}: {reason}")

    def to_dict(self):
        percent = round(100 * self.bytes_done / self.bytes_total, 1) if self.bytes_total else None
        return {
            "id": self.pk,
            "action": self.action,
            "state": self.state,
            "state_label": self.get_state_display(),
            "active": self.is_active,
            "source": {"grid": self.source_grid, "app": self.source_app},
            "target": {"grid": self.target_grid, "app": self.target_app},
            "helper": self.helper_app,
            "started_by": self.started_by,
            "created": self.created.isoformat(),
            "finished": self.finished.isoformat() if self.finished else None,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "percent": percent,
            "rate": self.rate,
            "eta_seconds": self.eta_seconds,
            "downtime_seconds": self.downtime.total_seconds() if self.downtime else None,
            "downtime_parts": self.timings,
            "held": self.held,
            "attention": self.attention,
            "apps": self.app_states(),
            "duration_seconds": self.duration.total_seconds() if self.duration else None,
            "error": self.error,
        }


class JobEvent(models.Model):
    """Something that happened during a job, from MIG or from the helper's progress log."""

    class Level(models.TextChoices):
        INFO = "info"
        WARNING = "warning"
        ERROR = "error"

    job = models.ForeignKey(MigrationJob, models.CASCADE, related_name="events")
    created = models.DateTimeField(default=timezone.now)
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    phase = models.CharField(max_length=16, blank=True)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    # The helper numbers its progress lines; filing them twice must not duplicate them.
    seq = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["created", "pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["job", "seq"],
                condition=Q(seq__isnull=False),
                name="event_helper_seq_once",
            )
        ]
        indexes = [
            # The job page and the monitor's log tail read one job's events in time order.
            models.Index(fields=["job", "created"], name="event_job_created_idx"),
        ]

    def __str__(self):
        return f"[{self.level}] {self.message}"


class LockHeld(Exception):
    def __init__(self, lock):
        self.lock = lock
        job = lock.job
        super().__init__(
            f"a {job.action} of {job.source_grid}/{job.source_app} to "
            f"{job.target_grid}/{job.target_app} is under way (job #{job.pk}, started by "
            f"{job.started_by or 'unknown'} at {job.created:%Y-%m-%d %H:%M:%S %Z})"
        )


class LockQuerySet(models.QuerySet):
    def current(self):
        return self.select_related("job").first()


class Lock(models.Model):
    """ "A migration or snapshot of this app is under way."

    At most one exists: the `slot` column is always 1 and unique, so the database, not
    Python, refuses a second lock. It lives in the database on the config volume, so it
    travels with the app and `startup` finds it wherever the app comes up.
    """

    slot = models.PositiveSmallIntegerField(default=1, editable=False)
    job = models.OneToOneField(MigrationJob, models.PROTECT, related_name="lock")
    created = models.DateTimeField(default=timezone.now)

    objects = LockQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["slot"], name="lock_only_one"),
            models.CheckConstraint(condition=Q(slot=1), name="lock_slot_is_one"),
        ]

    def __str__(self):
        return f"lock for job #{self.job_id}"

    @classmethod
    def acquire(cls, **job_fields):
        """Create a job and take the lock for it, or raise LockHeld. Atomic."""
        try:
            with transaction.atomic():
                job = MigrationJob.objects.create(**job_fields)
                lock = cls.objects.create(job=job)
        except IntegrityError:
            held = cls.objects.current()
            if held is None:  # released in between; the caller may simply retry
                raise
            raise LockHeld(held) from None
        job.event(f"Lock taken by {job.started_by or 'unknown'}.", phase=job.state)
        return lock
