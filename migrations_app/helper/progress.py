"""The helper's progress log: JSON lines, appended, readable by MIG while it runs."""

import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from . import protocol


def human_bytes(n):
    """1536 -> "1.5 KiB"; None -> "?"."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


# Events the helper keeps in memory for its status endpoint.
EVENTS_KEPT = 200


class RateMeter:
    """Rate and ETA of one step, over its last WINDOW seconds.

    An average from the start of a pass would count its first seconds (connecting, listing
    files), and its ETA would be far too long; and no ETA is told until the step has run
    MIN_SECONDS and done MIN_FRACTION of its work, when a guess is worth showing.
    """

    WINDOW = 5.0
    MIN_SECONDS = 2.0
    MIN_FRACTION = 0.01
    # One sample per this many seconds at most: the hashing reports at every file, and
    # 5 s of 30,000 files a second kept every one took 15 MiB at 200,000 files.
    RESOLUTION = 0.1

    def __init__(self, total, clock=time.monotonic, done=0):
        self.total = max(int(total), 1)
        self.clock = clock
        self.started = clock()
        self.samples = deque([(self.started, done)])

    def update(self, done):
        """(bytes per second, seconds left or None) after `done` bytes."""
        now = self.clock()
        if len(self.samples) > 1 and now - self.samples[-2][0] < self.RESOLUTION:
            self.samples[-1] = (now, done)
        else:
            self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.WINDOW:
            self.samples.popleft()
        then, done_then = self.samples[0]
        rate = (done - done_then) / (now - then) if now > then else 0.0
        eta = None
        if rate > 0 and now - self.started >= self.MIN_SECONDS and done >= self.MIN_FRACTION * self.total:
            eta = max(self.total - done, 0) / rate
        return max(rate, 0.0), eta


def now_iso():
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class ProgressLog:
    """Appends numbered lines; each is flushed whole, so a reader never sees half a line.

    It is the helper's journal: a helper restarted by its grid opens the same file and goes
    on numbering, and `summary` tells it what the journal held when it was opened.

    With `strict` off (a failing helper cleaning up), a line that cannot be written (a full
    disk) is kept in memory for the status endpoint, and `write_error` says why.
    """

    def __init__(self, path, min_interval=0.5):
        self.path = path
        self.min_interval = min_interval
        self._last_progress = 0.0
        self._lock = threading.Lock()
        self.strict = True
        self.write_error = None
        self.summary = Summary()
        # What the journal says now, this run's lines too (for the status endpoint; its
        # events are `events`, bounded).
        self.now = Summary()
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            text = ""
        for line in parse_lines(text):
            self.summary.add(line)
            self.now.add(line, keep_events=False)
        if text and not text.endswith("\n"):
            self._append(b"\n")  # a line torn by a crash: the next one starts afresh
        self.seq = self.summary.seq
        self.phase = self.summary.phase
        self.latest = self.summary.latest
        self.events = self.summary.events[-EVENTS_KEPT:]
        # Extra fields for every line (the helper adds the states of the three apps).
        self.context = dict
        # Called with each fact once its line is written (the helper's freeze, for tests).
        self.after_fact = None

    def _append(self, data):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def _write(self, line):
        with self._lock:
            self.seq += 1
            line = {"seq": self.seq, "time": now_iso(), "phase": self.phase, **self.context(), **line}
            try:
                self._append((json.dumps(line, sort_keys=True) + "\n").encode())
            except OSError as error:
                if self.strict:
                    raise
                self.write_error = error
            self.latest = line
            self.now.add(line, keep_events=False)
            if line["kind"] == protocol.EVENT:
                self.events.append(line)
                del self.events[:-EVENTS_KEPT]
            return line

    def event(self, message, level="info", phase=None, **data):
        if phase:
            self.phase = phase
        line = self._write({"kind": protocol.EVENT, "level": level, "message": message, **data})
        if self.after_fact is not None and "fact" in data:
            self.after_fact(data["fact"])
        return line

    def progress(self, done, total, rate, eta, message="", force=False):
        """How far the current step is (see protocol.StepProgress), written at most every
        `min_interval` seconds unless forced."""
        now = time.monotonic()
        if not force and now - self._last_progress < self.min_interval:
            return None
        self._last_progress = now
        return self._write(
            {
                "kind": protocol.PROGRESS,
                "bytes_done": int(done),
                "bytes_total": int(total),
                "rate": round(rate, 1),
                "eta": None if eta is None else round(eta, 1),
                "message": message,
            }
        )


@dataclass(frozen=True)
class Downtime:
    """From the stop request on the source to the first answer of the app that came up, in
    seconds, with its parts (None where the journal does not say)."""

    total: float
    stop: float | None = None
    final_pass: float | None = None
    verify: float | None = None
    start: float | None = None  # the decision and starting the app, until it listens
    health: float | None = None  # from listening to the first answer at its published URL

    PARTS = ("stop", "final_pass", "verify", "start", "health")

    def to_dict(self):
        return {name: getattr(self, name) for name in ("total", *self.PARTS)}


@dataclass
class Summary:
    """What a progress log says so far: MIG and the helper read journal lines through it
    alone, so both tell the same story from them."""

    phase: str = ""
    events: list = field(default_factory=list)
    latest: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    seq: int = 0
    progress: dict | None = None  # the last progress line
    apps: dict | None = None
    bytes_moved: int = 0

    @property
    def result(self) -> protocol.Result | None:
        """How the helper ended, or None while it has not."""
        result = self.facts.get(protocol.RESULT, {}).get("result")
        return protocol.Result(result) if result else None

    @property
    def error(self):
        return self.facts.get(protocol.RESULT, {}).get("error", "")

    @property
    def decision(self) -> str | None:
        """The cut-over decision the helper learned, if it did (commit | rollback)."""
        return self.facts.get(protocol.DECISION, {}).get("decision")

    @property
    def failure(self) -> protocol.Failure | None:
        """Why the helper failed (or was cancelled), once it began to roll back."""
        said = self.facts.get(protocol.RESULT) or self.facts.get(protocol.FAILING) or {}
        return protocol.Failure.from_dict(said.get("failure"))

    @property
    def cancel(self) -> dict | None:
        """{"by", "refused"} once the helper answered a cancel."""
        if line := self.facts.get(protocol.CANCEL_REFUSED):
            return {"by": line.get("by", ""), "refused": line.get("message", "")}
        if line := self.facts.get(protocol.CANCELLING):
            return {"by": line.get("by", ""), "refused": ""}
        return None

    @property
    def prediction(self) -> protocol.Prediction | None:
        """The latest predicted downtime, for a job with a budget."""
        return protocol.Prediction.from_dict(self.facts.get(protocol.PREDICTED, {}).get("prediction"))

    @property
    def target_url(self) -> str:
        return self.facts.get(protocol.TARGET_DEFINED, {}).get("url", "")

    def has(self, fact):
        return fact in self.facts

    def add(self, line, keep_events=True):
        self.seq = max(self.seq, line.get("seq", 0))
        self.phase = line.get("phase") or self.phase
        self.latest = line
        self.apps = line.get("apps", self.apps)
        self.bytes_moved = max(self.bytes_moved, line.get("bytes_moved", 0))
        if line.get("kind") == protocol.PROGRESS:
            self.progress = line
        if line.get("kind") == protocol.EVENT:
            if keep_events:
                self.events.append(line)
            if fact := line.get("fact"):
                self.facts[fact] = line
            if line.get("phase") != self.progress_phase:
                self.progress = None  # a new phase: its step has not reported yet

    @property
    def progress_phase(self):
        return (self.progress or {}).get("phase")

    def fact_time(self, fact):
        """When the latest line with `fact` was written (epoch seconds), or None."""
        line = self.facts.get(fact)
        if line is None:
            return None
        return line.get("at") or datetime.fromisoformat(line["time"]).timestamp()

    def downtime(self) -> Downtime | None:
        """The downtime of the last cut-over, once the app that came up has answered."""
        stopping, answered = self.fact_time(protocol.SOURCE_STOPPING), self.fact_time(protocol.APP_ANSWERED)
        if stopping is None or answered is None or answered < stopping:
            return None
        marks = [
            stopping,
            self.fact_time(protocol.SOURCE_STOPPED),
            self.fact_time(protocol.FINAL_PASS_DONE),
            self.fact_time(protocol.VERIFIED),
            self.fact_time(protocol.APP_STARTED),
            answered,
        ]
        parts = {}
        for name, begin, end in zip(Downtime.PARTS, marks[:-1], marks[1:], strict=True):
            fits = begin is not None and end is not None and stopping <= begin <= end <= answered
            parts[name] = round(end - begin, 3) if fits else None
        return Downtime(round(answered - stopping, 3), **parts)


def parse_lines(text):
    """Progress lines from log text; a torn last line (still being written) is skipped."""
    lines = []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and "seq" in line:
            lines.append(line)
    return lines
