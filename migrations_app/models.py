import uuid
from datetime import UTC, datetime, timedelta

from django.db import IntegrityError, models, transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from .grids.gridinfo import GridConfig
from .helper import failures, protocol
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

    def arrived(self, grid, app) -> int:
        """This MIG runs in the target of an active migration: the app has started here,
        whatever the record, copied when the helper said hands off, says. A job that says
        less is moved on to starting (before MIG answers, so no page shows the copy's
        pre-copy); the journal, filed next, tells the rest. Returns how many were."""
        starting = MigrationJob.ACTIVE_STATES.index(MigrationJob.State.STARTING)
        return self.filter(
            action=MigrationJob.Action.MIGRATE,
            target_grid=grid,
            target_app=app,
            state__in=MigrationJob.ACTIVE_STATES[:starting],
        ).update(state=MigrationJob.State.STARTING, updated=timezone.now())

    def measured_copy_rate(self) -> float | None:
        """Bytes per second of the last job's first pre-copy pass, for estimates."""
        return self.filter(copy_rate__gt=0).order_by("-created").values_list("copy_rate", flat=True).first()

    def measured_timings(self) -> dict:
        """The downtime and its parts (see record_downtime) as the last finished job that
        measured them did, for estimates; {} if none did."""
        for timings in (
            self.filter(state=MigrationJob.State.DONE)
            .order_by("-finished")
            .values_list("timings", flat=True)[:5]
        ):
            if timings and timings.get("total") is not None:
                return timings
        return {}

    def measured_downtime(self) -> float | None:
        """The last finished job's downtime, in seconds, for estimates."""
        return self.measured_timings().get("total")


def new_uid():
    return uuid.uuid4().hex


class MigrationJob(models.Model):
    """One migration or snapshot attempt; kept forever as history.

    State transitions (the active states are the phases of docs/DESIGN.md, "The migration"):

        pending ─► provisioning ─► precopy ─► stopping ─► final_sync ─► verifying
            ─► starting ─► finishing ─► done
        any active state before starting ─► rolling_back ─► failed | cancelled

    - pending: the lock is taken, the job exists; `run_job` is about to provision the helper.
    - provisioning: `run_job` is giving the helper its files and provisioning it.
    - precopy … starting: reported by the helper as it works (MIG is down from stopping on).
    - finishing: the helper is done; `startup` on the side that came up completes the job.
    - rolling_back: the helper failed, or was cancelled: it restarts the source and removes
      what the job created; `error` already says why.
    - done: `startup` saw the expected side come up and cleaned up.
    - failed: from any active state, with `error` saying why in one line (a provisioning
      error, the helper's reason, the helper lost, a rollback of the cut-over) and
      `error_detail` what the tools said.
    - cancelled: an operator cancelled it before the commit; rolled back like a failure.
    - overridden: from any active state, when an operator overrode the lock.

    States only move forward (`advance`): a journal line read late never takes a job back.
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
        PRECOPY = protocol.PRECOPY, protocol.LABELS[protocol.PRECOPY]
        STOPPING = protocol.STOPPING, protocol.LABELS[protocol.STOPPING]
        FINAL_SYNC = protocol.FINAL_SYNC, protocol.LABELS[protocol.FINAL_SYNC]
        VERIFYING = protocol.VERIFYING, protocol.LABELS[protocol.VERIFYING]
        STARTING = protocol.STARTING, protocol.LABELS[protocol.STARTING]
        FINISHING = protocol.FINISHING, protocol.LABELS[protocol.FINISHING]
        ROLLING_BACK = protocol.ROLLING_BACK, protocol.LABELS[protocol.ROLLING_BACK]
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"
        OVERRIDDEN = "overridden"

    # The phases the helper reports, in the order a job goes through them.
    HELPER_PHASES = [
        State.PRECOPY,
        State.STOPPING,
        State.FINAL_SYNC,
        State.VERIFYING,
        State.STARTING,
        State.FINISHING,
        State.ROLLING_BACK,
    ]
    ACTIVE_STATES = [State.PENDING, State.PROVISIONING, *HELPER_PHASES]
    ENDED_STATES = [State.DONE, State.FAILED, State.CANCELLED, State.OVERRIDDEN]
    # The monitor's log tail while a job runs (an ended job's status has every event).
    EVENTS_SHOWN = 15

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
    bytes_total = models.BigIntegerField(default=0, help_text="the app's data, as pre-flight measured it")
    bytes_moved = models.BigIntegerField(default=0, help_text="data sent by every pass of the job")
    # How far the current step is (protocol.StepProgress), as the helper last said.
    progress = models.JSONField(null=True, blank=True)
    # The last line of the helper's journal filed into this job.
    journal_seq = models.PositiveIntegerField(default=0)
    copy_rate = models.FloatField(default=0, help_text="bytes per second of the first pre-copy pass")
    # When the helper began stopping the source: the app serves no one from then on.
    source_stopped = models.DateTimeField(null=True, blank=True)
    # When MIG answered again after the stop: on the target (migrate) or the source (snapshot).
    app_up = models.DateTimeField(null=True, blank=True)
    # Why it failed: one line (the summary, naming the phase and the likely cause), what the
    # tools said, and the phase and cause (see protocol.Failure).
    error = models.TextField(blank=True)
    error_detail = models.TextField(blank=True)
    failed_phase = models.CharField(max_length=16, blank=True)
    failure_cause = models.CharField(max_length=24, blank=True)
    # {"by": who asked, "refused": why not, if it came too late}; see migration.cancel.
    cancel = models.JSONField(default=dict, blank=True)
    # Where the target answers once it runs (known once the helper defined it).
    target_url = models.CharField(max_length=2048, blank=True)
    # A snapshot job that writes into an earlier snapshot copy: only the changes move.
    refresh_of = models.ForeignKey(
        "Snapshot", models.SET_NULL, null=True, blank=True, related_name="refreshes"
    )
    bwlimit_kbps = models.PositiveIntegerField(null=True, blank=True)
    # The downtime the operator allows, in seconds, and what happens if the helper predicts
    # more before the stop (protocol.OverBudget); and its latest protocol.Prediction.
    max_downtime = models.FloatField(null=True, blank=True)
    over_budget = models.CharField(
        max_length=8,
        choices=[(o.value, o.value) for o in protocol.OverBudget],
        default=protocol.OverBudget.STOP.value,
    )
    prediction = models.JSONField(default=dict, blank=True)
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
                condition=Q(bytes_moved__gte=0) & Q(bytes_total__gte=0),
                name="job_bytes_not_negative",
            ),
            models.CheckConstraint(
                condition=Q(max_downtime__isnull=True) | Q(max_downtime__gt=0),
                name="job_max_downtime_positive",
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

    def starting_since(self, moment: float) -> bool:
        """Whether this job was created at or after `moment` (epoch seconds, this host's
        clock) and has not got its helper at work yet: only the MIG that created it knows
        such a job (it has not travelled anywhere)."""
        early = (self.State.PENDING, self.State.PROVISIONING)
        return self.state in early and self.created.timestamp() >= moment

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
    def downtime_seconds(self) -> float | None:
        """As the helper measured it (to the first answer), else as MIG saw it."""
        if self.timings.get("total") is not None:
            return self.timings["total"]
        return self.downtime.total_seconds() if self.downtime is not None else None

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
        """File the helper's events (each once) and take what its lines say, read as the
        helper reads them (progress.Summary): a phase only ever moves the job forward."""
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
        said = Summary()
        for line in lines:
            said.add(line, keep_events=False)
        if not said.seq:
            return
        updates = {
            "journal_seq": max(self.journal_seq, said.seq),
            "bytes_moved": max(self.bytes_moved, said.bytes_moved),
        }
        phases = [line["phase"] for line in lines if line.get("phase") in protocol.PHASES]
        furthest = max(phases, key=protocol.PHASES.index, default=None)
        if furthest and self.is_before(furthest):
            updates["state"] = furthest
        if said.progress:
            step = protocol.StepProgress.from_line(said.progress)
            updates["progress"] = {**step.to_dict(), "phase": said.progress.get("phase")}
        elif furthest:
            updates["progress"] = None  # a new phase, no word yet on how far it is
        if said.apps:
            updates["apps"] = said.apps
        facts = said.facts
        if line := facts.get(protocol.SOURCE_STOPPING):
            updates["source_stopped"] = datetime.fromisoformat(line["time"])
        if line := facts.get(protocol.APP_ANSWERED):
            updates["app_up"] = datetime.fromtimestamp(line["at"], UTC)
        if protocol.TARGET_DEFINING in facts:
            updates["target_created"] = True
        if said.target_url:
            updates["target_url"] = said.target_url
        if prediction := said.prediction:
            updates["prediction"] = prediction.to_dict()
        for line in lines:
            if line.get("pass_number") == 1 and line.get("seconds"):
                updates["copy_rate"] = line.get("changed_bytes", 0) / line["seconds"]
        if said.cancel:
            updates["cancel"] = said.cancel
        if failure := said.failure:
            updates.update(self.failure_fields(failure))
        updates["updated"] = timezone.now()
        MigrationJob.objects.filter(pk=self.pk, state__in=self.ACTIVE_STATES).update(**updates)
        self.refresh_from_db()

    def is_before(self, phase):
        """Whether the job's state comes before `phase` (states only move forward)."""
        order = self.ACTIVE_STATES
        return self.state in order and order.index(self.state) < order.index(phase)

    @staticmethod
    def failure_fields(failure: protocol.Failure) -> dict:
        return {
            "error": failure.summary,
            "error_detail": failure.detail,
            "failed_phase": failure.phase,
            "failure_cause": str(failure.cause),
        }

    @property
    def failure(self) -> protocol.Failure | None:
        if not self.error:
            return None
        cause = protocol.Cause.parse(self.failure_cause)
        return protocol.Failure(self.error, cause, self.failed_phase, self.error_detail)

    def failure_from(self, error) -> protocol.Failure:
        """A Failure for an error MIG met itself (provisioning, a helper gone)."""
        grids = {self.source_grid: self.source_grid, self.target_grid: self.target_grid}
        phase = self.state if self.state in protocol.PHASES else self.State.PROVISIONING
        return failures.describe(error, phase, grids, self.target_grid)

    def helper_summary(self):
        """What the helper has reported, from the events filed so far."""
        summary = Summary()
        for data in self.events.filter(seq__isnull=False).order_by("seq").values_list("data", flat=True):
            summary.add(data)
        return summary

    def end(self, state, failure: protocol.Failure | str | None = None):
        """End the job (done, failed, cancelled or overridden) and release its lock, in one
        transaction, so that no reader ever sees an ended job holding the lock. Once: a job
        that ended stays as it was; returns whether this call ended it. `failure` says why
        it failed (a message MIG met itself is described as one)."""
        if state not in self.ENDED_STATES:
            raise ValueError(f"a job ends as done, failed, cancelled or overridden, not {state}")
        if isinstance(failure, str):
            failure = self.failure_from(failure)
        now = timezone.now()
        with transaction.atomic():
            changed = MigrationJob.objects.filter(pk=self.pk, state__in=self.ACTIVE_STATES).update(
                state=state,
                finished=now,
                updated=now,
                progress=None,
                attention="",
                status_token="",  # the helper's status is nobody's business any more
                **(self.failure_fields(failure) if failure else {}),
            )
            Lock.objects.filter(job=self).delete()
            if changed and self.action == self.Action.SNAPSHOT:
                Snapshot.objects.record(MigrationJob.objects.get(pk=self.pk))
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
        if self.state in (self.State.FAILED, self.State.CANCELLED):
            target = "removed" if self.target_created else "absent"
            return {"source": "running", "helper": "destroyed", "target": target}
        # Overridden: nothing was touched on any grid, so nothing is known.
        return {"source": "not checked", "helper": "not checked", "target": "not checked"}

    def override(self, by, reason):
        """An operator ends a stuck job: recorded, lock released, nothing touched on a grid."""
        self.event(f"Lock overridden by {by}: {reason}", level="warning", data={"by": by})
        self.end(
            self.State.OVERRIDDEN,
            protocol.Failure(f"Overridden by {by}: {reason}", protocol.Cause.OTHER, self.state),
        )

    def links(self) -> dict:
        """Where what the job made lives: the app's new home, or the snapshot copy."""
        if self.state != self.State.DONE:
            return {}
        if self.action == self.Action.MIGRATE:
            return {"new_home": self.target_url} if self.target_url else {}
        return {"snapshot": reverse("snapshots") + f"#snapshot-{self.target_grid}-{self.target_app}"}

    def to_dict(self):
        """The job's protocol.Status, as MIG knows it, with the last EVENTS_SHOWN events of an
        active job and every event of an ended one."""
        # The monitor polls this every second: rows, not models (and not their data).
        events = self.events.order_by("-created", "-pk").values_list("created", "level", "phase", "message")
        events = list(events[: self.EVENTS_SHOWN] if self.is_active else events)[::-1]
        failure = self.failure
        downtime = self.timings or ({"total": self.downtime_seconds} if self.downtime_seconds else None)
        return protocol.Status(
            job=self.pk,
            action=self.action,
            state=self.state,
            state_label=self.get_state_display(),
            active=self.is_active,
            answered_by="mig",
            seq=self.journal_seq,
            apps=self.app_states(),
            bytes_total=self.bytes_total,
            bytes_moved=self.bytes_moved,
            progress=self.progress if self.is_active else None,
            result=None,
            failure=failure.to_dict() if failure else None,
            cancel=self.cancel or None,
            downtime=downtime,
            prediction=self.prediction or None,
            target_url=self.target_url,
            events=[
                {"time": created.isoformat(), "level": level, "phase": phase, "message": message}
                for created, level, phase, message in events
            ],
            source={"grid": self.source_grid, "app": self.source_app},
            target={"grid": self.target_grid, "app": self.target_app},
            started_by=self.started_by,
            created=self.created.isoformat(),
            finished=self.finished.isoformat() if self.finished else None,
            duration_seconds=self.duration.total_seconds() if self.duration else None,
            held=self.held,
            attention=self.attention,
            links=self.links(),
            helper_url=self.status_url if self.is_active else "",
        ).to_dict()


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


class SnapshotQuerySet(models.QuerySet):
    def kept(self):
        return self.exclude(state=Snapshot.State.DELETED)

    def record(self, job):
        """What a snapshot job that just ended made of its copy (in end()'s transaction)."""
        taken = {"job": job, "taken": job.source_stopped or job.finished, "bytes": job.bytes_total}
        if job.refresh_of_id is not None:
            if job.state == MigrationJob.State.DONE:
                self.filter(pk=job.refresh_of_id).update(state=Snapshot.State.COMPLETE, **taken)
            elif job.bytes_moved > 0 or job.failed_phase in protocol.PHASES:
                # It had begun to write into the copy: now that is part new, part old.
                self.filter(pk=job.refresh_of_id).update(state=Snapshot.State.INCOMPLETE, job=job)
            return
        same_name = self.kept().filter(grid=job.target_grid, app=job.target_app)
        if same_name.filter(job=job).exists():
            return  # the job was ended again (startup run twice): it is recorded already
        # Pre-flight found the name free: a copy recorded under it earlier is gone.
        same_name.update(
            state=Snapshot.State.DELETED, deleted=timezone.now(), deleted_by="(gone from its grid)"
        )
        if job.state == MigrationJob.State.DONE:
            self.create(grid=job.target_grid, app=job.target_app, owner=job.owner_tag, **taken)


class Snapshot(models.Model):
    """A snapshot copy this app made: a stopped app on a grid, kept until an operator deletes
    it, and recorded in MIG's database so that it travels with the app.

    States:
        complete ─► (a refresh: a snapshot job into it) ─► complete, only the changes moved
                                                       └─► incomplete, if it failed after it
                                                           began to write: refresh it again or
                                                           delete it; it cannot be started
        complete | incomplete ─► deleted (removed from its grid; kept as history)

    While a refresh runs, `refreshing` says so (the job is active).

    `owner` is the tag the copy carries on its grid (that of the job that made it): only a
    copy with that tag is ever refreshed or deleted. Starting a copy makes it an app of its
    own, with its own MIG (`started`); it stays listed here.
    """

    class State(models.TextChoices):
        COMPLETE = "complete"
        INCOMPLETE = "incomplete"
        DELETED = "deleted"

    grid = models.CharField(max_length=64)
    app = models.CharField(max_length=64)
    owner = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=State.choices, default=State.COMPLETE)
    # The job that last wrote into it (the one that made it, or its latest refresh).
    job = models.ForeignKey(MigrationJob, models.PROTECT, related_name="+")
    # When its data was taken: the source's stop for the final pass.
    taken = models.DateTimeField()
    bytes = models.BigIntegerField(default=0)
    created = models.DateTimeField(default=timezone.now)
    started = models.DateTimeField(null=True, blank=True)
    started_by = models.CharField(max_length=150, blank=True)
    deleted = models.DateTimeField(null=True, blank=True)
    deleted_by = models.CharField(max_length=150, blank=True)

    objects = SnapshotQuerySet.as_manager()

    class Meta:
        ordering = ["-taken"]
        constraints = [
            models.UniqueConstraint(
                fields=["grid", "app"], condition=~Q(state="deleted"), name="snapshot_one_copy_per_name"
            ),
        ]

    def __str__(self):
        return f"snapshot {self.grid}/{self.app} ({self.state})"

    @property
    def name(self):
        return f"{self.grid}/{self.app}"

    @property
    def anchor(self):
        """Its id on the snapshots page (job pages link to it)."""
        return f"snapshot-{self.grid}-{self.app}"

    @property
    def refreshing(self):
        return self.refreshes.active().exists()

    def mark_started(self, by):
        Snapshot.objects.filter(pk=self.pk).update(started=timezone.now(), started_by=by)
        self.refresh_from_db()

    def mark_deleted(self, by):
        Snapshot.objects.filter(pk=self.pk).update(
            state=self.State.DELETED, deleted=timezone.now(), deleted_by=by
        )
        self.refresh_from_db()
