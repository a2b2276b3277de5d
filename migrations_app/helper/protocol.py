"""What MIG and its helper agree on: names, files, the progress line format, and the one
status shape that MIG's JSON, the helper's endpoint and the monitor page share."""

import enum
from dataclasses import asdict, dataclass, field

TEMPLATE = "MigHelper"
# Files MIG gives the helper, under the helper app's secrets/ (mode 0600).
SECRET_CONFIG = "config"
SECRET_KEY = "key"
SECRET_TOKEN = "token"
# Files the helper writes, relative to the helper app's directory.
WORK_VOLUME = "work"
PROGRESS_FILE = f"volumes/{WORK_VOLUME}/progress.jsonl"
STATUS_FILE = f"volumes/{WORK_VOLUME}/status.json"
# MIG's runner writes this once it has seen HANDS_OFF and will write nothing more to the
# source's volumes; the helper waits for it (a while) before it arms the cut-over.
HANDS_OFF_ACK_NAME = "hands-off.ack"
HANDS_OFF_ACK_FILE = f"volumes/{WORK_VOLUME}/{HANDS_OFF_ACK_NAME}"
# An operator asks the helper to stop and roll back (JSON: {"by": who}); the helper answers
# in its journal, with CANCELLING or CANCEL_REFUSED. Written by MIG through the target
# grid, or by the helper's status endpoint while MIG is down.
CANCEL_NAME = "cancel.json"
CANCEL_FILE = f"volumes/{WORK_VOLUME}/{CANCEL_NAME}"

# Line kinds in the progress log. Events are filed into the job's history; progress lines
# only update its counters (there are many of them).
EVENT = "event"
PROGRESS = "progress"

# Phases, in order, as the job's states name them. A job's phase only moves forward along
# PHASES; rolling back comes after whichever phase failed.
PRECOPY = "precopy"
STOPPING = "stopping"
FINAL_SYNC = "final_sync"
VERIFYING = "verifying"
STARTING = "starting"
FINISHING = "finishing"
ROLLING_BACK = "rolling_back"
PHASES = (PRECOPY, STOPPING, FINAL_SYNC, VERIFYING, STARTING, FINISHING, ROLLING_BACK)
LABELS = {
    PRECOPY: "Pre-copy",
    STOPPING: "Stopping source",
    FINAL_SYNC: "Final pass",
    VERIFYING: "Verifying",
    STARTING: "Starting",
    FINISHING: "Finishing",
    ROLLING_BACK: "Rolling back",
}

# Facts the helper reports as events with a "fact" key; MIG acts on them, and a restarted
# helper resumes from them (its journal is the truth about what it did).
# About to define the target: from here on the target may exist, and it is this job's.
TARGET_DEFINING = "target_defining"
# The target exists (new, or the earlier snapshot copy a refresh writes into): "url" is
# where it answers once it runs.
TARGET_DEFINED = "target_defined"
# The source stops soon: MIG writes nothing more to its volumes (its database, its logs),
# so that what the final pass lists after the stop stays as it was. MIG's runner may lag
# behind the journal, and may live outside the app (started from a terminal): it says when
# it is done (HANDS_OFF_ACK_FILE), and the helper waits for that before it stops the source
# (it hashes meanwhile: what MIG writes until then, the final pass fetches).
HANDS_OFF = "hands_off"
# The index for the final pass is built (with the times it trusts: "clean_before_ns").
INDEXED = "indexed"
# The cut-over record is armed on the source grid, its watchdog running.
ARMED = "armed"
# Downtime starts when the helper starts stopping the source: from then on it serves no one.
SOURCE_STOPPING = "source_stopping"
SOURCE_STOPPED = "source_stopped"
FINAL_PASS_DONE = "final_pass_done"
VERIFIED = "verified"
# The cut-over decision that holds ("decision": commit | rollback, "by": who made it).
DECISION = "decision"
# The app that comes up after the cut-over (the target, or the source after a snapshot or a
# rollback) is being started, has started, and first answered at its published URL.
APP_STARTING = "app_starting"
APP_STARTED = "app_started"
APP_ANSWERED = "app_answered"
# The downtime, predicted before the stop for a job with a budget ("prediction": a
# Prediction's fields); the latest one counts.
PREDICTED = "predicted"
# A helper restarted by its grid picked up its journal.
RESUMED = "resumed"
# A cancel was asked for ("by"): the helper rolls back; or it came after the commit, and
# the helper goes on ("reason" says why).
CANCELLING = "cancelling"
CANCEL_REFUSED = "cancel_refused"
# The helper failed, or was cancelled, and rolls back ("failure": why, a Failure).
FAILING = "failing"
RESULT = "result"
# For fault tests only (MIG_HELPER_FREEZE_AFTER): the facts after which the helper may be
# asked to freeze itself (SIGSTOP), so that a test kills it exactly there, not somewhere in
# a window of a few milliseconds it would have to hit.
FREEZE_POINTS = (SOURCE_STOPPED, DECISION)


class Result(enum.StrEnum):
    """How the helper's work ended (the "result" of its RESULT line)."""

    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"  # an operator cancelled before the commit; rolled back


class OverBudget(enum.StrEnum):
    """What a job with a downtime budget does when the predicted downtime is over it."""

    STOP = "stop"  # end the job before the cut-over: the source app keeps running
    PROCEED = "proceed"  # go on, and say that the budget will be missed


class Cause(enum.StrEnum):
    """What most likely made a job fail, in words an operator acts on."""

    DISK_FULL = "disk full"
    READ_ONLY = "read-only file system"
    DENIED = "permission denied"
    UNREACHABLE = "host unreachable"
    HOST_KEY = "host key mismatch"
    VERIFY_MISMATCH = "verify mismatch"
    STALLED = "copy stalled"
    APP = "the app misbehaved"
    CANCELLED = "cancelled"
    OVER_BUDGET = "over the downtime budget"
    STOPPED = "helper stopped"
    LOST = "helper lost"
    OTHER = "unexpected error"

    @classmethod
    def parse(cls, value) -> "Cause":
        """A cause read back (from a journal, a database): one not known here is OTHER."""
        return cls(value) if value in cls._value2member_map_ else cls.OTHER


@dataclass(frozen=True)
class Failure:
    """Why a job failed, as a person reads it: a one-line summary naming the phase and the
    likely cause, with what the tools said (`detail`) kept once, apart from it."""

    summary: str
    cause: Cause = Cause.OTHER
    phase: str = ""
    detail: str = ""

    @classmethod
    def from_dict(cls, data: dict | None) -> "Failure | None":
        if not data or not data.get("summary"):
            return None
        return cls(
            summary=data["summary"],
            cause=Cause.parse(data.get("cause")),
            phase=data.get("phase", ""),
            detail=data.get("detail", ""),
        )

    def to_dict(self) -> dict:
        return {"summary": self.summary, "cause": str(self.cause), "phase": self.phase, "detail": self.detail}


@dataclass(frozen=True)
class Prediction:
    """The downtime were the source stopped now, in seconds, with its parts (the names of
    helper.progress.Downtime's): what the job page shows beside the measured one."""

    seconds: float
    budget: float
    parts: dict
    changed_seconds: float  # of the final pass: reading what changed since the last live sweep
    entries: int
    files: int  # changed since the hashing
    bytes: int  # their sizes
    round: int  # of the pre-copy rounds tried to bring it within the budget

    def describe(self) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {value:.1f}s" for name, value in self.parts.items())

    @classmethod
    def from_dict(cls, data: dict | None) -> "Prediction | None":
        fields = cls.__dataclass_fields__
        if not isinstance(data, dict) or not all(f in data for f in fields):
            return None
        return cls(**{f: data[f] for f in fields})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepProgress:
    """How far the current step is (a copy pass, the hashing, the final pass), in bytes."""

    done: int
    total: int
    rate: float  # bytes per second, over the last few seconds
    eta: float | None  # seconds; None until it can be told
    message: str = ""

    @classmethod
    def from_line(cls, line: dict | None) -> "StepProgress | None":
        if not line or "bytes_done" not in line:
            return None
        return cls(
            line["bytes_done"],
            line["bytes_total"],
            line.get("rate", 0.0),
            line.get("eta"),
            line.get("message", ""),
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Status:
    """A job's status: the one shape MIG's JSON, the helper's status endpoint and the
    monitor page share (the page renders it, whoever answered). Fields only MIG can know
    (who started the job, when it ended, what an operator must do) keep their defaults in
    the helper's answer."""

    job: int
    action: str
    state: str  # a phase, or one of MIG's own states (pending, done, failed, ...)
    state_label: str
    active: bool
    answered_by: str  # "mig" or "helper"
    # The last line of the helper's journal this status reflects: of two statuses in one
    # state, the one with the higher seq is newer.
    seq: int = 0
    apps: dict = field(default_factory=dict)  # source, helper, target: a word each
    bytes_total: int = 0  # the app's data, as pre-flight measured it
    bytes_moved: int = 0  # data sent over the network so far, every pass of the job
    progress: dict | None = None  # StepProgress of the current step
    result: str | None = None  # Result, once the helper has one
    failure: dict | None = None  # Failure, once the job failed or was cancelled
    cancel: dict | None = None  # {"by", "refused"}: a cancel was asked for
    downtime: dict | None = None  # Downtime.to_dict(), once the app answered again
    prediction: dict | None = None  # Prediction.to_dict(), for a job with a downtime budget
    target_url: str = ""  # where the target answers once it runs (known once defined)
    events: list = field(default_factory=list)  # {"time", "level", "phase", "message"}
    # Known to MIG only.
    source: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    started_by: str = ""
    created: str | None = None
    finished: str | None = None
    duration_seconds: float | None = None
    held: bool = False
    attention: str = ""
    links: dict = field(default_factory=dict)  # {"new_home"|"snapshot": url}
    helper_url: str = ""

    def to_dict(self) -> dict:
        # Shallow: every field is JSON already, and asdict's deep copy of the events was a
        # fifth of what answering a poll costs.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def public_event(line: dict) -> dict:
    """An event as the status shows it."""
    return {
        "time": line.get("time"),
        "level": line.get("level", "info"),
        "phase": line.get("phase", ""),
        "message": line.get("message", ""),
    }
