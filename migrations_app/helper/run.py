"""
The helper's job, as small steps:

    precopy      define the target app, copy every volume with rsync while the source runs
                 (again only after a long pass, while the delta shrinks), hash both sides,
                 and start the source's agents for the final pass
    stopping     stop the source app (never by force)
    final_sync   copy what changed since, with the source stopped
    verifying    the copy matches the stopped source, file by file
    starting     migrate: start the target; snapshot: restart the source

Any failure: destroy the target if this job created it, make sure the source runs, and
record why. The last line of the progress log is always the result; then the helper
keeps answering status requests until MIG destroys it.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
import time

from ..grids import AppExists, AppState, GridError, open_grid
from ..grids.gridinfo import GridConfig
from . import protocol, sync
from .copy import CopyError, rsync_argv, run_rsync
from .progress import ProgressLog, human_bytes
from .status import serve_status

LINGER_SECONDS = 3600
# Files modified this close before the hashing started may change again without their
# time changing (coarse file-time ticks, clock jitter): the final pass reads them again.
RACY_MARGIN = 1.0
# Seconds a pre-copy pass must have taken for another one to be worth it (see step_precopy).
ANOTHER_PASS_AFTER = 30.0
# Seconds a started app has to listen where its grid publishes it (see start_app).
LISTEN_TIMEOUT = 30.0


class Failure(Exception):
    """The job cannot go on; the message says why, for the operator."""


class Stopped(BaseException):
    """SIGTERM arrived: someone stopped or destroyed the helper."""


class Helper:
    def __init__(self, config_path, work_dir):
        secrets_dir = os.path.dirname(os.path.abspath(config_path))
        with open(config_path) as f:
            self.config = json.load(f)
        with open(os.path.join(secrets_dir, protocol.SECRET_TOKEN)) as f:
            self.token = f.read().strip()
        self.key_file = os.path.join(secrets_dir, protocol.SECRET_KEY)
        self.work_dir = work_dir
        self.log = ProgressLog(os.path.join(work_dir, "progress.jsonl"))
        self.action = self.config["action"]
        source, target = self.config["source"], self.config["target"]
        self.source_app, self.target_app = source["app"], target["app"]
        self.source_grid = GridConfig.from_table(source["grid"], source["table"])
        # The helper runs on the target grid's host: it reaches that grid directly.
        target_grid = GridConfig.from_table(target["grid"], target["table"])
        self.target_grid = dataclasses.replace(target_grid, transport="local", host="", host_key="")
        self.bwlimit = self.config.get("bwlimit_kbps")
        self.stall_timeout = float(self.config.get("stall_timeout", 60))
        self.max_passes = int(self.config.get("max_passes", 4))
        self.source = self.target = self.final = None
        self.target_created = self.verified = False
        self.finished = False
        self.volumes = []
        self.total_bytes = 0
        # What the monitor shows about the three apps; every progress line carries it.
        self.apps = {"source": "running", "helper": "running", "target": "absent"}
        self.log.context = lambda: {"apps": dict(self.apps)}

    # --- running ------------------------------------------------------------------------

    def run(self):
        signal.signal(signal.SIGTERM, self.on_sigterm)
        server = serve_status(self.target_grid.app_host or "127.0.0.1", self.token, self.snapshot)
        host, port = server.server_address[:2]
        self.write_status(f"http://{host}:{port}/status")
        self.log.event(
            f"Helper started for job #{self.config['job']}: {self.action} "
            f"{self.source_grid.name}/{self.source_app} → {self.target_grid.name}/{self.target_app}",
            phase=protocol.PRECOPY,
        )
        try:
            self.step_open()
            self.step_precopy()
            self.step_prepare_final()
            self.step_stop_source()
            self.step_final_sync()
            self.step_verify()
            self.step_start()
            self.succeed()
        except (Failure, Stopped, GridError, CopyError, sync.SyncError, OSError, ValueError) as e:
            self.fail(self.reason(e))
        self.linger()
        return 0

    def reason(self, error):
        if isinstance(error, Stopped):
            return f"the helper was stopped during {self.log.phase}"
        return str(error)

    def on_sigterm(self, signum, frame):
        if self.finished:
            sys.exit(0)
        raise Stopped()

    def write_status(self, url):
        path = os.path.join(self.work_dir, "status.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"url": url, "pid": os.getpid()}, f)
        os.replace(tmp, path)

    def snapshot(self):
        """What the status endpoint answers."""
        return {
            "job": self.config["job"],
            "phase": self.log.phase,
            "latest": self.log.latest,
            "events": self.log.events[-30:],
            "finished": self.finished,
        }

    def linger(self):
        """Keep answering status until MIG destroys the helper (or an hour passes)."""
        deadline = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < deadline:
            time.sleep(1)

    # --- steps --------------------------------------------------------------------------

    def step_open(self):
        self.source = open_grid(self.source_grid, self.key_file, ssh_client="openssh")
        self.target = open_grid(self.target_grid, self.key_file)
        # File times on the source are in its clock; mind the difference to ours.
        self.source_clock_offset = self.source.info().time - time.time()
        # Pre-flight measured the data a moment ago; walking it again would only delay the copy.
        app = self.source.describe(self.source_app, sizes=False)
        if app.state != AppState.RUNNING:
            raise Failure(f"the source app is {app.state}, not running")
        self.manifest = app.manifest
        self.volumes = app.volumes
        self.source_path = app.path
        self.total_bytes = int(self.config.get("bytes_total") or 0)

    def step_precopy(self):
        try:
            self.target.define(self.target_app, self.manifest)
        except AppExists:
            raise Failure(
                f"the target app {self.target_app} already exists on {self.target_grid.name}"
            ) from None
        self.target_created = True
        self.apps["target"] = "copying"
        self.target_path = self.target.describe(self.target_app, sizes=False).path
        self.volumes_path = os.path.join(self.target_path, "volumes")
        self.log.event(
            f"Defined {self.target_app} on {self.target_grid.name}; copying {len(self.volumes)} "
            f"volume(s), {human_bytes(self.total_bytes)}, while the source runs",
            fact=protocol.TARGET_CREATED,
        )
        previous = None
        # Files untouched since (in the source's clock, with a margin) need not be read twice.
        self.copy_began_ns = int((time.time() + self.source_clock_offset - RACY_MARGIN) * 1e9)
        for number in range(1, self.max_passes + 1):
            stats = self.copy_pass(f"pre-copy pass {number}")
            changed = stats.changed_bytes
            self.log.event(
                f"Pre-copy pass {number}: {human_bytes(changed)} changed, "
                f"{human_bytes(stats.literal_bytes)} sent in {stats.seconds:.1f}s",
                pass_number=number,
                changed_bytes=changed,
                seconds=round(stats.seconds, 3),
            )
            # Another rsync pass reads every file that changed meanwhile on both sides, and
            # the hashing then reads them again. After a short pass, little has changed: the
            # final pass sends it block by block, reading only the source. After a long
            # one, another pass pays off while the delta keeps shrinking and is not tiny.
            if stats.seconds < ANOTHER_PASS_AFTER:
                break
            if number > 1 and (changed <= max(1 << 20, self.total_bytes // 1000) or changed >= previous / 2):
                break
            previous = changed
        self.step_index()

    def step_index(self):
        """Take both sides' block hashes now, while the app runs, so the stopped app is read
        only once (see sync.build_index)."""
        self.log.event(
            "Hashing for the final pass; MIG leaves the source's volumes alone", fact=protocol.HANDS_OFF
        )
        started = time.time()
        self.clean_before_ns = int((started + self.source_clock_offset - RACY_MARGIN) * 1e9)
        self.index = sync.Index(os.path.join(self.work_dir, "index.sqlite3"))
        files, read, differing = sync.build_index(
            self.source, self.source_app, self.volumes_path, self.index, self.copy_began_ns
        )
        seconds = time.time() - started
        self.log.event(
            f"Hashed {files} files in {seconds:.1f}s, and the copies of the {read} changed since the "
            f"copy began (rsync checked the rest as it sent them); {differing} differ (written to "
            "while copied)",
            files=files,
            copies_read=read,
            differing=differing,
            seconds=round(seconds, 3),
        )

    def step_prepare_final(self):
        def on_progress(received):
            elapsed = max(time.monotonic() - self.final_started, 1e-3)
            self.log.progress(received, received, received / elapsed, 0, "final pass")

        self.final = sync.FinalPass(
            self.source,
            self.source_app,
            self.volumes_path,
            self.index,
            self.clean_before_ns,
            on_progress,
            self.bwlimit,
        )
        self.final.open()

    def step_stop_source(self):
        self.apps["source"] = "stopping"
        message = f"Stopping the source app {self.source_app}"
        self.log.event(message, phase=protocol.STOPPING, fact=protocol.SOURCE_STOPPING)
        try:
            self.source.stop(self.source_app)
        except GridError as e:
            raise Failure(f"the source app did not stop: {e}") from None
        self.apps["source"] = "stopped"
        self.log.event("Source stopped")

    def step_final_sync(self):
        self.log.event("Final pass with the source stopped", phase=protocol.FINAL_SYNC)
        self.final_started = started = time.monotonic()
        files, received = self.final.run()
        seconds = time.monotonic() - started
        self.log.event(
            f"Final pass: {files} file(s) changed since hashed; {human_bytes(received)} of changed "
            f"blocks sent in {seconds:.1f}s",
            files=files,
            changed_bytes=received,
            seconds=round(seconds, 3),
        )

    def step_verify(self):
        self.log.event("Verifying the copy file by file", phase=protocol.VERIFYING)
        entries, problems = sync.verify(self.volumes_path, self.index)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise Failure(f"verify failed, {len(problems)} difference(s): {shown}")
        self.verified = True
        self.log.event(
            f"Verified {entries} entries: type, mode, size, time and content match the stopped source"
        )

    def step_start(self):
        if self.action == "migrate":
            self.apps["target"] = "starting"
            self.log.event(f"Starting {self.target_app} on {self.target_grid.name}", phase=protocol.STARTING)
            try:
                self.start_app(self.target, self.target_grid, self.target_app)
            except GridError as e:
                raise Failure(f"the target app failed to start: {e}") from None
            self.apps["target"] = "running"
        else:
            self.apps["target"] = "stopped"
            self.apps["source"] = "starting"
            self.log.event(f"Restarting the source app {self.source_app}", phase=protocol.STARTING)
            try:
                self.start_app(self.source, self.source_grid, self.source_app)
            except GridError as e:
                raise Failure(f"the source app failed to restart: {e}") from None
            self.apps["source"] = "running"

    def start_app(self, grid, grid_config, app):
        """Start an app, which has MIG in it: it counts as started once it listens where its
        grid publishes apps, which is sooner and surer than its staying up for a while."""
        listen = grid_config.app_listen
        result = grid.start(app, listen=listen, timeout=LISTEN_TIMEOUT)
        if result.get("listening") is False:
            self.log.event(
                f"{app} runs, but nothing listens on {listen[0]}:{listen[1]} ({grid_config.name}'s "
                f"app_url) after {LISTEN_TIMEOUT:g}s",
                level="warning",
            )

    # --- endings ------------------------------------------------------------------------

    def succeed(self):
        assert self.verified, "a job never succeeds without a verified copy"
        self.finished = True
        self.apps["helper"] = "done"
        what = "started" if self.action == "migrate" else "kept stopped; source restarted"
        self.log.event(
            f"Done: {self.target_grid.name}/{self.target_app} {what}",
            phase=protocol.FINISHING,
            fact=protocol.RESULT,
            result="ok",
        )

    def fail(self, reason):
        # Cleanup must not be interrupted by a second SIGTERM.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        failed_during = self.log.phase
        self.log.event(f"Failed during {failed_during}: {reason}", level="error", phase=protocol.FAILED)
        if self.final is not None:
            self.final.close()
        if self.target_created:
            try:
                result = self.target.destroy(self.target_app)
                leftovers = result.get("leftovers") or []
                note = f" (could not remove: {'; '.join(leftovers[:3])})" if leftovers else ""
                self.apps["target"] = "removed"
                self.log.event(f"Removed the partial target {self.target_app}{note}")
            except GridError as e:
                self.log.event(f"Could not remove the partial target: {e}", level="error")
        if self.source is not None:
            try:
                if self.source.state(self.source_app) != AppState.RUNNING:
                    self.start_app(self.source, self.source_grid, self.source_app)
                    self.apps["source"] = "running"
                    self.log.event(f"Restarted the source app {self.source_app}")
            except GridError as e:
                self.log.event(f"Could not restart the source app: {e}", level="error")
        self.finished = True
        self.apps["helper"] = "failed"
        signal.signal(signal.SIGTERM, self.on_sigterm)
        self.log.event(
            f"Failed: {reason}",
            level="error",
            fact=protocol.RESULT,
            result="failed",
            error=reason,
            failed_during=failed_during,
        )

    # --- copying ------------------------------------------------------------------------

    def copy_pass(self, label):
        """One rsync of the whole volumes/ directory, reporting progress."""
        started = time.monotonic()
        total = max(self.total_bytes, 1)
        if self.source_grid.transport == "ssh":
            source = f"{self.source_grid.host}:{self.source_path}/volumes/"
            remote_shell = self.source.transport.remote_shell()
        else:
            source, remote_shell = f"{self.source_path}/volumes/", None

        def on_progress(done, percent):
            done = min(done, total)
            elapsed = max(time.monotonic() - started, 1e-3)
            rate = done / elapsed
            eta = (total - done) / rate if rate > 0 else None
            self.log.progress(done, total, rate, eta, label)

        argv = rsync_argv(source, f"{self.volumes_path}/", remote_shell, self.bwlimit, self.stall_timeout)
        stats = run_rsync(argv, on_progress, self.stall_timeout)
        self.log.progress(total, total, total / max(stats.seconds, 1e-3), 0, label, force=True)
        return stats


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mighelper", description="MIG's helper: copies one app.")
    parser.add_argument("--config", required=True, help="the job's config file (from MIG)")
    parser.add_argument("--work", required=True, help="directory for the progress log")
    args = parser.parse_args(argv)
    return Helper(args.config, args.work).run()
