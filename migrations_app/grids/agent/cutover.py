"""
The cut-over record: one decision per migration, made once, durably, next to the source app:
commit (the copy is the app from now on) or roll back (the source is). See DESIGN.md, "The
cut-over protocol". The decision file is created with link(2): exactly one claimant
succeeds, and the file is whole the moment it exists.
"""

import json
import os
import shutil
import subprocess
import time
import uuid

from .base import (
    AgentError,
    Invalid,
    NotFound,
    agent_argv,
    ensure_dir,
    now,
    read_json_or_none,
    sync_dir,
    write_durably,
)
from .procs import have_proc, pid_alive, proc_stat

DECISIONS = ("commit", "rollback")


class Cutover:
    """The cut-over record of one app: <app>/cutover/ (never copied: not in a volume)."""

    def __init__(self, grid, app):
        self.grid, self.app = grid, app
        self.dir = os.path.join(grid.app_dir(app), "cutover")

    def path(self, name):
        return os.path.join(self.dir, name)

    def state(self):
        """The record as a dict, or None if there is none."""
        record = read_json_or_none(self.path("record.json"))
        if record is None:
            return None
        decision = read_json_or_none(self.path("decision")) or {}
        abandoned = read_json_or_none(self.path("abandoned"))
        try:
            heartbeat_age = max(0.0, time.time() - os.stat(self.path("heartbeat")).st_mtime)
        except FileNotFoundError:
            heartbeat_age = None
        return {
            **record,
            "decision": decision.get("decision"),
            "decided_by": decision.get("by", ""),
            "decided_at": decision.get("at"),
            "reason": decision.get("reason", ""),
            "abandoned": abandoned is not None,
            "closed": os.path.exists(self.path("closed")),
            "heartbeat_age": heartbeat_age,
            "watchdog": self.watchdog_pid() is not None,
        }

    def current(self, job):
        """The record, which must be `job`'s."""
        state = self.state()
        if state is None or state["job"] != job:
            raise NotFound(f"app {self.app!r} has no cut-over record for this job")
        return state

    def start_refusal(self):
        """Why the app must not start now, or None. What "never both" rests on."""
        state = self.state()
        if state is None:
            return None
        job = f"job #{state['job_id']}"
        if state["decision"] is None:
            return (
                f"refusing to start {self.app}: a cut-over ({job}) is under way and not decided; "
                f"if that job is over, run `manage.py recover {state['job_id']}` in the app's MIG"
            )
        if state["decision"] == "commit" and state["action"] == "migrate" and not state["abandoned"]:
            return (
                f"refusing to start {self.app}: it moved to {state['target']} ({job} committed at "
                f"{state['decided_at']}), and both copies would take writes; to undo a move whose "
                f"target never started, run `manage.py recover {state['job_id']} --give-up-target`"
            )
        return None

    def arm(self, job, job_id, action, target, timeout):
        current = self.state()
        if current is not None and current["job"] != job:
            if self.start_refusal() is not None:
                raise AgentError(
                    f"app {self.app!r}: the cut-over of job #{current['job_id']} is not finished"
                )
            shutil.rmtree(self.dir)
            current = None
        if current is None:
            ensure_dir(self.dir, 0o700)
            record = {
                "job": job,
                "job_id": job_id,
                "action": action,
                "target": target,
                "timeout": timeout,
                "armed_at": time.time(),
            }
            tmp = self.path(f".record.{uuid.uuid4().hex}.tmp")
            write_durably(tmp, json.dumps(record).encode())
            os.replace(tmp, self.path("record.json"))
            sync_dir(self.dir)
        self.beat(job)
        if self.watchdog_pid() is None:
            self.start_watchdog(job)
        return self.state()

    def beat(self, job):
        self.current(job)
        path = self.path("heartbeat")
        try:
            os.utime(path)
        except FileNotFoundError:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    def claim(self, job, decision, by, reason):
        """Make `decision` unless one was made; returns the state, with the one that holds."""
        if decision not in DECISIONS:
            raise Invalid(f"a decision is one of {', '.join(DECISIONS)}, not {decision!r}")
        self.current(job)
        self.link_once("decision", {"decision": decision, "by": by, "reason": reason, "at": now()})
        return self.state()

    def abandon(self, job, by, reason):
        """Give up a committed target that never started: the source may start again."""
        state = self.current(job)
        if state["decision"] != "commit":
            raise AgentError(f"app {self.app!r}: job #{state['job_id']} did not commit: nothing to give up")
        self.link_once("abandoned", {"by": by, "reason": reason, "at": now()})
        return self.state()

    def link_once(self, name, content):
        tmp = self.path(f".{name}.{uuid.uuid4().hex}.tmp")
        write_durably(tmp, json.dumps(content).encode())
        try:
            os.link(tmp, self.path(name))
        except FileExistsError:
            pass  # someone was first: theirs holds
        finally:
            os.unlink(tmp)
        sync_dir(self.dir)

    def close(self, job):
        self.current(job)
        if not os.path.exists(self.path("closed")):
            write_durably(self.path("closed"), now().encode())
        return self.state()

    def clear(self, job):
        state = self.state()
        if state is None or state["job"] != job:
            return False
        shutil.rmtree(self.dir)
        return True

    def watchdog_pid(self):
        try:
            with open(self.path("watchdog.pid")) as f:
                pid, start_time = f.read().split()
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return int(pid) if pid_alive(int(pid), start_time if have_proc() else None) else None

    def start_watchdog(self, job):
        with open(self.path("watchdog.log"), "ab") as log:
            # Its own session: it outlives this agent, the connection and the helper.
            proc = subprocess.Popen(
                agent_argv(self.grid.root, "watchdog", self.app, "--job", job),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        info = proc_stat(proc.pid) if have_proc() else None
        with open(self.path("watchdog.pid"), "w") as f:
            f.write(f"{proc.pid} {info[2] if info else 0}\n")
