"""The helper's progress log: JSON lines, appended, readable by MIG while it runs."""

import json
import os
import threading
import time
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


def now_iso():
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class ProgressLog:
    """Appends numbered lines; each is flushed whole, so a reader never sees half a line."""

    def __init__(self, path, min_interval=0.5):
        self.path = path
        self.seq = 0
        self.phase = ""
        self.min_interval = min_interval
        self._last_progress = 0.0
        self._lock = threading.Lock()
        self.latest = {}
        self.events = []
        # Extra fields for every line (the helper adds the states of the three apps).
        self.context = dict

    def _write(self, line):
        with self._lock:
            self.seq += 1
            line = {"seq": self.seq, "time": now_iso(), "phase": self.phase, **self.context(), **line}
            data = (json.dumps(line, sort_keys=True) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.latest = line
            if line["kind"] == protocol.EVENT:
                self.events.append(line)
            return line

    def event(self, message, level="info", phase=None, **data):
        if phase:
            self.phase = phase
        return self._write({"kind": protocol.EVENT, "level": level, "message": message, **data})

    def progress(self, done, total, rate, eta, message="", force=False):
        """A counter update, written at most every `min_interval` seconds unless forced."""
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


@dataclass
class Summary:
    """What a progress log says so far."""

    phase: str = ""
    events: list = field(default_factory=list)
    latest: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    seq: int = 0

    @property
    def result(self):
        """ "ok", "failed", or None while the helper has not finished."""
        return self.facts.get(protocol.RESULT, {}).get("result")

    @property
    def error(self):
        return self.facts.get(protocol.RESULT, {}).get("error", "")

    def add(self, line):
        self.seq = max(self.seq, line.get("seq", 0))
        self.phase = line.get("phase") or self.phase
        self.latest = line
        if line.get("kind") == protocol.EVENT:
            self.events.append(line)
            if fact := line.get("fact"):
                self.facts[fact] = line


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
