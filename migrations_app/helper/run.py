"""
The helper's job, as small steps (docs/DESIGN.md, "The migration", "The cut-over protocol"):

    open         reach both grids; a helper restarted by its grid reads its journal and
                 the cut-over record, and carries on from there
    precopy      define the target (journaled first), copy every volume with rsync while the
                 source runs (again only after a long pass), hash both sides, and start the
                 source's agents for the final pass
    arm          create the cut-over record on the source grid, and its watchdog; the
                 helper's heartbeat keeps the watchdog waiting from now on
    stopping     stop the source app (never by force)
    final_sync   copy what changed since, with the source stopped
    verifying    the copy matches the stopped source, entry by entry
    commit       claim the decision: the answer holds, whoever made it
    starting     migrate: start the target; snapshot: restart the source; close the record,
                 then wait for the app's first answer at its published URL

Any failure before the commit, or a cancel (an operator's, by a file in the work volume),
rolls back: claim rollback, restart the source first, then remove the target this job
created, then say why. After a migration's commit nothing restarts the source, and a cancel
is refused. The last line of the journal is always the result; then the helper keeps
answering status requests until MIG destroys it.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

from ..grids import (
    AppExists,
    AppState,
    AuthError,
    Decision,
    GridError,
    HostKeyError,
    TransportError,
    open_grid,
)
from ..grids.agent.tree import RACY_NS
from ..grids.errors import OperationFailed
from ..grids.gridinfo import GridConfig
from . import failures, protocol, sync
from .copy import CopyError, rsync_argv, run_rsync, stop_orphan
from .progress import ProgressLog, RateMeter, human_bytes
from .status import origin_of, serve_status

LINGER_SECONDS = 3600
# How long the status endpoint answers after the outcome: the page has moved on to the MIG
# that ended the job long before; after it, the endpoint says only that the job has ended.
STATUS_AFTER_RESULT = 120.0
# Files modified this close before the hashing started may change again without their
# time changing (coarse file-time ticks, clock jitter): the final pass reads them again.
RACY_MARGIN = 1.0
# Seconds a pre-copy pass must have taken for another one to be worth it (see step_precopy).
ANOTHER_PASS_AFTER = 30.0
# Seconds a started app has to listen where its grid publishes it (see start_app).
LISTEN_TIMEOUT = 30.0
# Seconds the started app has to answer at its published URL (see wait_first_answer).
ANSWER_TIMEOUT = 60.0
# Seconds the helper waits for MIG to confirm "hands off" (see wait_hands_off_ack).
HANDS_OFF_WAIT = 30.0
HEARTBEAT_INTERVAL = 1.0
# Why a cancel after the commit changes nothing.
COMMITTED = "the cut-over is committed: the copy is verified and is the app now"
# Silence after which the source's watchdog rolls back: well above a restart of the helper.
HEARTBEAT_TIMEOUT = 15.0
# Backoff for an operation whose connection to a grid dropped, then for a copy pass.
RETRY_DELAYS = (1, 2, 4, 8, 16)
# Parts of a downtime as multiples of a listing of the running source walked in step with
# the copy (sync.forecast). The live pass lists and settles every entry (1.3 listings, as
# the final pass took when it ran after the stop). A sweep, live or after the stop, costs
# one lstat an entry, and verify looks only at what the pass touched: measured with
# ./dev bench (downtime scenario, 20,000 and 200,000 files), a sweep is 0.1-0.15 of a
# listing, verify under 0.02 of one.
LIVE_PASS_PER_LISTING = 1.3
SWEEP_PER_LISTING = 0.15
VERIFY_PER_LISTING = 0.02
# The other parts of a downtime, in seconds, when no earlier job of this MIG measured them:
# about twice what ./dev bench measured of MIG's own app (2026-12-05: stop 0.04-0.06 s, a
# prepared start 0.12-0.14 s, first answer 0.08-0.12 s); another app's may take longer.
DEFAULT_PARTS = {"stop": 0.1, "start": 0.25, "health": 0.2}
# The final pass reads each changed file whole on the source to find the blocks that
# differ (few, usually, and sent at once): about as fast as the hashing read everything,
# if that read enough to tell; otherwise this many bytes per second.
DEFAULT_READ_RATE = 500 << 20
# Pre-copy rounds at most (the first included) to bring a downtime within its budget.
BUDGET_ROUNDS = 3
# Sweeps of the running source at most, after the live pass (see step_live_sweeps).
LIVE_SWEEPS = 4
# How long the target's prepared start waits for the start (grids' prepare_start): longer
# than the copy, the hashing and the live rounds of all but the largest apps.
PREPARED_WAIT = 1800.0


class Failure(Exception):
    """The job cannot go on; the message says why, for the operator."""


class Interrupted(Failure):
    """A restarted helper finds its cut-over rolled back (by itself, or by another)."""


class BudgetExceeded(Failure):
    """The predicted downtime is over the operator's budget, and they chose to stop then."""


class Cancelled(Exception):
    """An operator cancelled the job before its commit."""

    def __init__(self, by):
        super().__init__(f"cancelled by {by}")
        self.by = by


class Stopped(BaseException):
    """SIGTERM arrived: someone stopped or destroyed the helper."""


class Resumed(Exception):
    """A helper restarted while it rolled back goes on rolling back, for the same reason."""

    def __init__(self, failure):
        super().__init__(failure.summary if failure else "the helper died while rolling back")
        self.failure = failure


def retryable(error):
    """A lost connection is worth another try; a refused key or host key is not."""
    return isinstance(error, TransportError) and not isinstance(error, HostKeyError | AuthError)


def close_once_open(opening: Future):
    """A connection opened for nothing (the job ended first) is closed, whenever it opens."""
    if opening.exception() is None:
        opening.result().close()


class Heartbeat:
    """Tells the source grid's watchdog, every second, that the helper lives.

    It runs in a thread with a connection of its own, so that no long operation of the
    helper delays it. A beat that fails is journaled once per spell; what ends the thread
    unexpectedly is kept in `error`, which the helper checks between steps.
    """

    def __init__(self, helper, driver=None):
        """`driver`: a connection to the source opened ahead (Helper.open_heartbeat_connection),
        else the thread opens one."""
        self.helper = helper
        self.driver = driver
        self.stopping = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self.run, name="heartbeat", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.thread.join(10)

    def run(self):
        helper, driver, failing = self.helper, self.driver, False
        try:
            while True:
                try:
                    driver = driver or helper.open_source()
                    driver.beat_cutover(helper.source_app, helper.job_uid)
                    if failing:
                        helper.log.event("Heartbeat restored")
                    failing = False
                except GridError as error:
                    if driver is not None:
                        driver.close()
                    driver = None
                    if not failing:
                        helper.log.event(
                            f"Heartbeat to {helper.source_grid.name} failed: {error}; its watchdog rolls "
                            f"back after {helper.heartbeat_timeout:g}s without one",
                            level="warning",
                        )
                    failing = True
                if self.stopping.wait(HEARTBEAT_INTERVAL):
                    return
        except Exception as error:  # never a silent death: the next step fails with it
            self.error = error
        finally:
            if driver is not None:
                driver.close()


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
        # What this helper did before, if the grid restarted it: its journal is the truth.
        self.journal = self.log.summary
        self.job_id, self.job_uid = self.config["job"], self.config["job_uid"]
        # Who defined the target: only an app of this owner is ever removed by this job.
        self.owner = f"mig-job:{self.job_uid}"
        self.action = self.config["action"]
        source, target = self.config["source"], self.config["target"]
        self.source_app, self.target_app = source["app"], target["app"]
        self.source_grid = GridConfig.from_table(source["grid"], source["table"])
        # The helper runs on the target grid's host: it reaches that grid directly.
        target_grid = GridConfig.from_table(target["grid"], target["table"])
        self.target_grid = dataclasses.replace(target_grid, transport="local", host="", host_key="")
        # How messages name each grid, to tell which one a failure is about.
        self.grid_marks = {self.source_grid.name: self.source_grid.address}
        self.grid_marks[target_grid.name] = target_grid.address
        self.bwlimit = self.config.get("bwlimit_kbps")
        self.stall_timeout = float(self.config.get("stall_timeout", 60))
        self.heartbeat_timeout = float(self.config.get("heartbeat_timeout", HEARTBEAT_TIMEOUT))
        self.max_passes = int(self.config.get("max_passes", 4))
        # The downtime budget, in seconds, and what to do if the prediction is over it.
        self.max_downtime = self.config.get("max_downtime")
        self.over_budget = self.config.get("over_budget") or protocol.OverBudget.STOP
        # The parts of the downtime the last finished job measured (see DEFAULT_PARTS).
        self.recent_timings = self.config.get("recent_timings") or {}
        self.read_rate = DEFAULT_READ_RATE
        self.source = self.target = self.live = self.final = self.standby = self.heartbeat = None
        self.forced = set()  # entries the next sweep describes again (see live_round)
        self.started_warm = []  # the components the start found prepared (step_prepare_start)
        self.round_seconds = 0.0  # how long the last live round took (see live_round)
        self.preparing = None  # the thread preparing the target's start (step_prepare_start)
        self.heartbeat_opening = None  # the heartbeat's connection, opening (open_heartbeat_connection)
        self.target_created = self.journal.has(protocol.TARGET_DEFINING)
        # A refresh writes into an earlier snapshot copy: the app of this owner is kept.
        self.refresh_owner = self.config.get("refresh_owner") or None
        # Where each app answers once it runs (the target's is known once it is defined).
        self.source_url = source.get("url") or self.source_grid.app_url
        self.target_url = self.journal.target_url
        # Pages that may ask the status endpoint: MIG's, on the source, then on the target.
        self.origins = {o for o in map(origin_of, (self.source_url, self.target_url)) if o}
        self.armed = self.verified = self.finished = False
        self.finished_at = None
        self.volumes = []
        self.total_bytes = int(self.config.get("bytes_total") or 0)
        # Data sent over the network by every pass of this job, an earlier run's included.
        self.moved = self.journal.bytes_moved
        self.rsync_pid_file = os.path.join(work_dir, "rsync.pid")
        self.cancel_path = os.path.join(work_dir, protocol.CANCEL_NAME)
        self.freeze_after = self.config.get("freeze_after") or None
        self.log.after_fact = self.freeze_if_asked
        self.cancel_answered = self.journal.cancel is not None
        self.cancel_checked = 0.0
        # What the monitor shows about the three apps; every line carries it.
        self.apps = self.journal.apps or {
            "source": "running",
            "helper": "running",
            "target": "absent",
        }
        # A first copy into an empty target sends what rsync reports done: it counts while the
        # pass runs (a pass cut short still sent something). Other passes count once done.
        self.moving = 0
        self.log.context = lambda: {"apps": dict(self.apps), "bytes_moved": self.moved + self.moving}

    # --- running ------------------------------------------------------------------------

    def run(self):
        signal.signal(signal.SIGTERM, self.on_sigterm)
        self.serve_status()
        if self.journal.result:
            # Restarted after it had finished: nothing more to do but answer status.
            self.mark_finished()
            self.linger()
            return 0
        if stop_orphan(self.rsync_pid_file):
            self.log.event("Stopped the rsync an earlier run of this helper left behind")
        if self.journal.seq:
            self.log.event(
                f"Restarted by {self.target_grid.name} after this helper died during "
                f"{self.journal.phase}; resuming from its journal",
                fact=protocol.RESUMED,
                phase=self.journal.phase,
            )
        else:
            self.log.event(
                f"Helper started for job #{self.job_id}: {self.action} "
                f"{self.source_grid.name}/{self.source_app} → {self.target_grid.name}/{self.target_app}",
                phase=protocol.PRECOPY,
            )
        try:
            self.step_open()
            if self.journal.phase == protocol.ROLLING_BACK:
                self.resume_rollback()
            if not self.resume_cutover():
                for step in (
                    self.step_precopy,
                    self.step_live_pass,
                    self.step_live_sweeps,
                    self.step_prepare_final,
                    self.step_arm,
                    self.step_stop_source,
                    self.step_final_sync,
                    self.step_verify,
                    self.step_commit,
                ):
                    self.check_cancel()
                    step()
            self.step_start()
            self.succeed()
        except (Exception, Stopped) as error:  # whatever it is, the job fails with it
            self.fail(self.failure_of(error))
        self.linger()
        return 0

    def failure_of(self, error) -> protocol.Failure:
        """What the journal, the job and the page say about `error`."""
        phase = self.log.phase
        if isinstance(error, Resumed):
            return error.failure or failures.describe(
                "the helper died while rolling back", phase, self.grid_marks, self.target_grid.name
            )
        if isinstance(error, Cancelled):
            return failures.cancelled(error.by, phase)
        if isinstance(error, BudgetExceeded):
            return protocol.Failure(str(error), protocol.Cause.OVER_BUDGET, phase)
        if isinstance(error, Interrupted):
            label = protocol.LABELS.get(phase, phase)
            return protocol.Failure(
                f"{label} failed: {error}; the source app runs again.", protocol.Cause.LOST, phase
            )
        if isinstance(error, Stopped):
            label = protocol.LABELS.get(phase, phase)
            return protocol.Failure(
                f"{label} failed: the helper was stopped from outside before it finished.",
                protocol.Cause.STOPPED,
                phase,
            )
        return failures.describe(error, phase, self.grid_marks, self.target_grid.name)

    # --- cancel -------------------------------------------------------------------------

    def cancel_request(self):
        """Who asked to cancel, or None (see protocol.CANCEL_FILE)."""
        try:
            with open(self.cancel_path) as f:
                by = json.load(f).get("by")
        except (OSError, ValueError, AttributeError):
            return None
        return str(by or "an operator")[:150]

    def check_cancel(self, every=0.0):
        """Before the commit, a cancel rolls the job back: raises Cancelled. With `every`,
        the file is looked at no more often than that many seconds (the hashing asks at
        every file)."""
        now = time.monotonic()
        if now - self.cancel_checked < every:
            return
        self.cancel_checked = now
        if by := self.cancel_request():
            if not self.cancel_answered:
                self.cancel_answered = True
                self.log.event(f"Cancel requested by {by}: rolling back", fact=protocol.CANCELLING, by=by)
            raise Cancelled(by)

    def refuse_late_cancel(self, why):
        """After the commit (or the end) a cancel changes nothing: say so, once."""
        if self.cancel_answered or not (by := self.cancel_request()):
            return
        self.cancel_answered = True
        self.log.event(
            f"Cancel requested by {by}, refused: {why}", level="warning", fact=protocol.CANCEL_REFUSED, by=by
        )

    def request_cancel(self, by):
        """The status endpoint's cancel, while MIG is down: the same file MIG would write."""
        if self.finished:
            return {"refused": "the job has finished"}
        tmp = self.cancel_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"by": by}, f)
        os.replace(tmp, self.cancel_path)
        return {"requested": True}

    def on_sigterm(self, signum, frame):
        if self.finished:
            sys.exit(0)
        raise Stopped()

    def serve_status(self):
        """The status endpoint, on the port an earlier run of this helper had if it can."""
        path = os.path.join(self.work_dir, "status.json")
        try:
            with open(path) as f:
                port = int(json.load(f)["url"].rsplit(":", 1)[1].split("/")[0])
        except (OSError, ValueError, KeyError, IndexError):
            port = 0
        host = self.target_grid.app_host or "127.0.0.1"
        options = {"origins": self.origins, "gone": self.status_gone, "cancel": self.request_cancel}
        try:
            server = serve_status(host, self.token, self.snapshot, port, **options)
        except OSError:
            server = serve_status(host, self.token, self.snapshot, **options)
        host, port = server.server_address[:2]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"url": f"http://{host}:{port}/status", "pid": os.getpid()}, f)
        os.replace(tmp, path)

    def snapshot(self):
        """What the status endpoint answers: the job's Status, as far as the helper knows."""
        now = self.log.now
        phase = self.log.phase or protocol.PRECOPY
        failure = now.failure
        downtime = now.downtime()
        prediction = now.prediction
        return protocol.Status(
            job=self.job_id,
            action=self.action,
            state=phase,
            state_label=protocol.LABELS.get(phase, phase),
            active=True,  # only MIG ends a job
            answered_by="helper",
            seq=self.log.seq,
            apps=dict(self.apps),
            bytes_total=self.total_bytes,
            bytes_moved=self.moved + self.moving,
            progress=protocol.StepProgress.from_line(now.progress).to_dict() if now.progress else None,
            result=now.result,
            failure=failure.to_dict() if failure else None,
            cancel=now.cancel,
            downtime=downtime.to_dict() if downtime else None,
            prediction=prediction.to_dict() if prediction else None,
            target_url=now.target_url,
            events=[protocol.public_event(e) for e in self.log.events[-30:]],
        ).to_dict()

    def close(self):
        """Let go of the grids: the source's agents, then the connections."""
        self.stop_readers()
        self.prepared()
        if self.heartbeat_opening is not None:  # the job ended before the arm
            self.heartbeat_opening.add_done_callback(close_once_open)
        for grid in (self.source, self.target):
            if grid is not None:
                try:
                    grid.close()
                except Exception as e:  # the helper is ending: say so, and go on ending
                    print(f"closing the connection to a grid: {type(e).__name__}: {e}", file=sys.stderr)

    def open_heartbeat_connection(self):
        """Open the heartbeat's own connection to the source now, as the copy begins, in a
        thread: opened once armed, its session and interpreter would start as the source
        stops, taking 0.13 of the 0.8 CPU-seconds the bench's final pass had. (Opened as
        the live pass began, it was not up by the arm on the tiny app: waiting for it
        added 0.25 s before the stop.)"""

        def opening():
            driver = self.open_source()
            try:
                driver.info()  # its agent up
            except BaseException:
                driver.close()
                raise
            return driver

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heartbeat-connection")
        self.heartbeat_opening = pool.submit(opening)
        pool.shutdown(wait=False)

    def heartbeat_connection(self):
        """The heartbeat's connection opened ahead, if it is up; else None, and the heartbeat
        opens its own, as before (one that failed to open is said; one still opening is
        closed once open): the stop waits for neither."""
        opening, self.heartbeat_opening = self.heartbeat_opening, None
        if opening is None:
            return None
        if not opening.done():
            opening.add_done_callback(close_once_open)
            return None
        if (error := opening.exception()) is not None:
            self.log.event(
                f"Opening the heartbeat's connection to {self.source_grid.name} ahead failed: {error}; "
                "it opens another",
                level="warning",
            )
            return None
        return opening.result()

    def stop_readers(self):
        """Stop the source's agents that still run: the final pass's, and those that were
        started ahead and not taken (after a failure)."""
        for readers in (self.live, self.final, self.standby):
            if readers is not None:
                readers.close()

    def linger(self):
        """Keep answering status until MIG destroys the helper (or an hour passes)."""
        deadline = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < deadline:
            self.refuse_late_cancel("the job has finished")
            time.sleep(1)

    def retrying(self, operation, what):
        """Run `operation()`, again after a lost connection, with backoff."""
        for attempt, delay in enumerate((*RETRY_DELAYS, None), 1):
            try:
                return operation()
            except TransportError as error:
                if delay is None or not retryable(error):
                    raise
                self.log.event(
                    f"{what}: {error}; trying again in {delay}s (attempt {attempt})", level="warning"
                )
                time.sleep(delay)

    def freeze_if_asked(self, fact):
        """Stop right here if a fault test asked to (see protocol.FREEZE_POINTS)."""
        if fact == self.freeze_after:
            os.kill(os.getpid(), signal.SIGSTOP)

    def check_heartbeat(self):
        if self.heartbeat is not None and self.heartbeat.error is not None:
            raise Failure(f"the heartbeat to {self.source_grid.name} stopped: {self.heartbeat.error!r}")

    def open_source(self):
        return open_grid(self.source_grid, self.key_file, ssh_client="openssh")

    # --- steps --------------------------------------------------------------------------

    def step_open(self):
        self.source = self.open_source()
        self.target = open_grid(self.target_grid, self.key_file)
        # The target's agent starts while the source is reached (each is a session and an
        # interpreter): defining the target then costs a round trip.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="target") as pool:
            target_ready = pool.submit(self.target.info)
            try:
                self.look_at_source()
            except BaseException:
                if error := target_ready.exception():
                    self.log.event(f"reaching {self.target_grid.name}: {error}", level="warning")
                raise
            target_ready.result()

    def look_at_source(self):
        # File times on the source are in its clock; mind the difference to ours.
        info = self.retrying(self.source.info, f"reaching {self.source_grid.name}")
        self.source_clock_offset = info.time - time.time()
        # Pre-flight measured the data a moment ago; walking it again would only delay the copy.
        app = self.retrying(
            lambda: self.source.describe(self.source_app, sizes=False), "describing the source"
        )
        if app.state != AppState.RUNNING and not self.journal.seq:
            raise Failure(f"the source app is {app.state}, not running")
        self.manifest = app.manifest
        self.volumes = app.volumes
        self.source_url = app.url or self.source_url

    def resume_rollback(self):
        """A helper restarted while it rolled back goes on rolling back (it does not copy
        again): raises Resumed, with the reason it had."""
        record = self.retrying(lambda: self.source.read_cutover(self.source_app), "reading the cut-over")
        if record is not None and record.job == self.job_uid:
            self.armed = True
            self.heartbeat = Heartbeat(self)
        raise Resumed(protocol.Failure.from_dict(self.journal.facts.get(protocol.FAILING, {}).get("failure")))

    def resume_cutover(self):
        """A restarted helper that had armed the cut-over carries out its decision, or rolls
        back if none was made. False if there is no cut-over of this job (pre-copy goes on)."""
        if not self.journal.seq:
            return False
        record = self.retrying(lambda: self.source.read_cutover(self.source_app), "reading the cut-over")
        if record is None or record.job != self.job_uid:
            if self.journal.has(protocol.ARMED):
                raise Failure(f"this job's cut-over record is gone from {self.source_grid.name}")
            return False
        self.armed = True
        self.heartbeat = Heartbeat(self)
        if record.decision is None:
            record = self.claim(
                Decision.ROLLBACK,
                f"the helper died during {self.journal.phase} and was restarted before the cut-over "
                "was decided",
            )
            if record.decided_by == "helper":
                raise Interrupted("the helper died before the cut-over was decided, so it was rolled back")
        else:
            self.note_decision(record)
        if record.decision == Decision.COMMIT and not record.abandoned:
            self.verified = True  # a commit is only ever claimed after verify
            return True
        raise Interrupted(f"the cut-over was rolled back by the {record.decided_by} ({record.reason})")

    def step_precopy(self):
        previous_start = self.journal.facts.get(protocol.TARGET_DEFINING, {}).get("copy_began_ns")
        # Files untouched since (in the source's clock, with a margin) need not be read twice.
        # A refreshed copy held files before this job began: every one is read.
        self.copy_began_ns = (
            None
            if self.refresh_owner
            else previous_start or int((time.time() + self.source_clock_offset - RACY_MARGIN) * 1e9)
        )
        # While the target is defined and the data copied, the agents that hash the source
        # and list it after the stop start, ready when their steps come.
        self.standby = sync.Standby(self.source, self.source_app)
        self.standby.start(sync.Reader.HASHING, sync.Reader.LISTING, sync.Reader.DELTA, sync.Reader.DELTA)
        self.open_heartbeat_connection()
        target = self.define_target()
        self.apps["target"] = "copying"
        self.volumes_path = target.volumes_dir
        hashing = self.start_hashing()
        try:
            self.copy_passes()
        except BaseException:
            hashing.stop()
            raise
        # The code is there: the target's start gets ready while the hashing ends.
        self.step_prepare_start()
        self.step_index(hashing, beside_copy=True)
        self.step_budget()

    def copy_passes(self):
        """rsync the volumes while the app runs, again while it pays off."""
        previous = None
        for number in range(1, self.max_passes + 1):
            fresh = number == 1 and not self.refresh_owner and not self.journal.has(protocol.TARGET_DEFINED)
            stats = self.copy_pass(f"pre-copy pass {number}", fresh)
            changed = stats.changed_bytes
            self.moved, self.moving = self.moved + stats.literal_bytes, 0
            self.log.event(
                f"Pre-copy pass {number}: {human_bytes(changed)} changed, "
                f"{human_bytes(stats.literal_bytes)} sent in {stats.seconds:.1f}s",
                pass_number=number,
                changed_bytes=changed,
                sent_bytes=stats.literal_bytes,
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

    def step_budget(self):
        """With a downtime budget: predict the downtime. While what changed since the hashing
        puts it over the budget, copy and hash again (BUDGET_ROUNDS at most, and only while
        that shrinks it); then, still over it, go on or end the job, as the operator chose.
        The source has not stopped: ending here leaves it running."""
        if self.max_downtime is None:
            return
        budget = float(self.max_downtime)
        previous = None
        for round_number in range(1, BUDGET_ROUNDS + 1):
            prediction = self.predict(round_number)
            if prediction.seconds <= budget:
                return
            changed = prediction.changed_seconds
            helps = changed > prediction.seconds - budget and (previous is None or changed < previous * 0.75)
            if round_number == BUDGET_ROUNDS or not helps:
                break
            previous = changed
            self.log.event(
                f"The downtime would be about {prediction.seconds:.1f}s, over the budget of {budget:g}s, "
                f"mostly for what changed since the hashing: copying and hashing again (round "
                f"{round_number + 1} of at most {BUDGET_ROUNDS})"
            )
            stats = self.copy_pass(f"pre-copy round {round_number + 1}")
            self.moved += stats.literal_bytes
            self.step_index(self.start_hashing())
        over = (
            f"The downtime would be about {prediction.seconds:.1f}s ({prediction.describe()}), over "
            f"the budget of {budget:g}s"
        )
        if self.over_budget == protocol.OverBudget.PROCEED:
            self.log.event(f"{over}: going on, as asked; the budget will be missed", level="warning")
            return
        raise BudgetExceeded(
            f"{over}, so the cut-over did not begin and the source app kept running. Try again when "
            "the app writes less, with a larger budget, or let the job go on over it."
        )

    def predict(self, round_number) -> protocol.Prediction:
        """The downtime were the source stopped now: the final pass and verify from a
        forecast (sync.forecast), the rest as the last job measured it."""
        self.log.event(f"Predicting the downtime: listing {self.source_app} as the final pass will")
        forecast = sync.forecast(
            self.source,
            self.source_app,
            self.volumes_path,
            self.index,
            self.clean_before_ns,
            lambda: self.check_cancel(every=0.5),
        )

        # What changed since the hashing, the live pass settles; the live sweeps, what the
        # app changes meanwhile. What the final pass then reads is what the app changed
        # since the last live round looked (and in the second before: see the agent's
        # tree.RACY_NS), up to the stop. Each is taken at the rate the app changed files
        # since the hashing read them, and is at most all of those files (one changed twice
        # is read once). Beside the copy, the hashing reads for seconds: a file changed
        # since it was read, on average, at the hashing's midpoint (the bench's final pass:
        # counted from the hashing's start, predicted 0.31 s, took 0.50; from its end,
        # predicted 1.13 s, took 0.44).
        changed_since_hashing = forecast.bytes / self.read_rate
        hashing_midpoint = (self.hashing_began + self.hashing_ended) / 2
        since_hashing = max(time.monotonic() - hashing_midpoint, 1e-3)

        def changed_within(seconds):
            return changed_since_hashing * min(1.0, seconds / since_hashing)

        measured = {k: v for k, v in self.recent_timings.items() if isinstance(v, int | float)}
        stop = measured.get("stop", DEFAULT_PARTS["stop"])
        live_pass = forecast.listing_seconds * LIVE_PASS_PER_LISTING + changed_since_hashing
        sweep = forecast.listing_seconds * SWEEP_PER_LISTING
        live_sweep = sweep + forecast.listing_seconds * VERIFY_PER_LISTING + changed_within(live_pass)
        # No live sweep follows a live pass shorter than RACY_MARGIN (see step_live_sweeps).
        last_round = live_sweep if live_pass >= RACY_MARGIN else live_pass
        changed_seconds = changed_within(RACY_NS / 1e9 + last_round + stop)
        parts = {
            "stop": stop,
            # What the sweep finds changed is fetched as it is found (sync.FinalPass.
            # fetch_at_once): the pass takes the longer of the two, not their sum (the
            # bench's: the sum predicted 0.49 s where it took 0.33).
            "final_pass": max(sweep, changed_seconds),
            "verify": forecast.listing_seconds * VERIFY_PER_LISTING,
            "start": measured.get("start", DEFAULT_PARTS["start"]),
            "health": measured.get("health", DEFAULT_PARTS["health"]),
        }
        prediction = protocol.Prediction(
            round(sum(parts.values()), 3),
            float(self.max_downtime),
            {k: round(v, 3) for k, v in parts.items()},
            round(changed_seconds, 3),
            forecast.entries,
            forecast.files,
            forecast.bytes,
            round_number,
        )
        self.log.event(
            f"Predicted downtime {prediction.seconds:.1f}s (budget {prediction.budget:g}s): "
            f"{prediction.describe()}; {forecast.files} file(s) changed since the hashing, "
            f"{human_bytes(forecast.bytes)} at most to send",
            fact=protocol.PREDICTED,
            prediction=prediction.to_dict(),
        )
        return prediction

    def define_target(self):
        """Define the target (or, for a refresh, take the snapshot copy it writes into);
        returns it, described."""
        if self.refresh_owner:
            return self.take_snapshot_copy()
        # Journaled before it exists: whatever happens next, clean-up knows it may be there.
        self.log.event(
            f"Defining {self.target_app} on {self.target_grid.name}",
            fact=protocol.TARGET_DEFINING,
            copy_began_ns=self.copy_began_ns,
        )
        self.target_created = True
        try:
            self.target.define(self.target_app, self.manifest, owner=self.owner)
            said = (
                f"Defined {self.target_app} on {self.target_grid.name}; copying {len(self.volumes)} "
                f"volume(s), {human_bytes(self.total_bytes)}, while the source runs"
            )
        except AppExists:
            if self.target.describe(self.target_app, sizes=False).manifest.get("owner") != self.owner:
                raise Failure(
                    f"the target app {self.target_app} already exists on {self.target_grid.name}"
                ) from None
            said = (
                f"{self.target_app} on {self.target_grid.name} was defined for this job; copying "
                f"{len(self.volumes)} volume(s), {human_bytes(self.total_bytes)}, while the source runs"
            )
        return self.target_defined(said)

    def take_snapshot_copy(self):
        """A refresh: the copy must be the snapshot this app made, and stopped."""
        existing = self.target.describe(self.target_app, sizes=False)
        if existing.manifest.get("owner") != self.refresh_owner:
            raise Failure(
                f"{self.target_grid.name}/{self.target_app} is not the snapshot copy this job was to "
                "refresh (its owner differs): left as it is"
            )
        if existing.state != AppState.STOPPED:
            raise Failure(
                f"the snapshot copy {self.target_app} is {existing.state}: a refresh needs it stopped"
            )
        return self.target_defined(
            f"Refreshing the snapshot copy {self.target_grid.name}/{self.target_app}: only the changes move"
        )

    def target_defined(self, said):
        target = self.target.describe(self.target_app, sizes=False)
        self.target_url = target.url
        if origin := origin_of(target.url):
            self.origins.add(origin)
        self.log.event(said, fact=protocol.TARGET_DEFINED, url=target.url)
        return target

    def start_hashing(self) -> sync.SourceHashing:
        """Begin hashing the source for the final pass (see sync.hash_source), in a thread:
        beside the copy, or just before step_index waits for it."""
        self.hashing_began = time.monotonic()
        self.clean_before_ns = int((time.time() + self.source_clock_offset - RACY_MARGIN) * 1e9)
        self.index = sync.Index(os.path.join(self.work_dir, "index.sqlite3"))
        agent = self.standby.take(sync.Reader.HASHING)
        return sync.SourceHashing(self.source, self.source_app, self.index, agent)

    def step_index(self, hashing: sync.SourceHashing, beside_copy: bool = False):
        """Take both sides' block hashes now, while the app runs, so the stopped app is read
        only once: the source's, from the hashing given (begun beside the copy, or just now), then
        the copy's (see sync.take_copies).

        A hashing beside the copy that failed is done again, alone: its connection may have
        dropped while rsync's pass was tried again (the copy goes on after such a drop, so
        must the hashing). Another failure fails the job, as ever."""
        self.log.event(
            "Hashing for the final pass; MIG leaves the source's volumes alone", fact=protocol.HANDS_OFF
        )
        try:
            files, beside = self.hashed(hashing), " beside the copy" if beside_copy else ""
        except Exception as error:
            if not beside_copy or error is not hashing.error:  # a cancel is no hashing's failure
                raise
            self.log.event(f"The hashing beside the copy stopped ({error}): hashing again", level="warning")
            files, beside = self.hashed(self.start_hashing()), ""
        read, differing = sync.take_copies(self.volumes_path, self.index, self.copy_began_ns)
        seconds = time.monotonic() - self.hashing_began
        self.log.event(
            f"Hashed {files} files in {seconds:.1f}s{beside}, and the copies of the {read} changed since "
            f"the copy began (rsync checked the rest as it sent them); {differing} differ (written to "
            "while copied)",
            fact=protocol.INDEXED,
            files=files,
            copies_read=read,
            differing=differing,
            seconds=round(seconds, 3),
        )

    def hashed(self, hashing: sync.SourceHashing) -> int:
        """Wait for the source's hashing, showing its progress and looking for a cancel;
        returns the files it hashed, or raises what ended it."""
        waited_from, hashed_before = time.monotonic(), hashing.hashed
        meter = RateMeter(self.total_bytes, done=hashed_before)
        try:
            while (files := hashing.wait(0.5)) is None:  # a cancel is looked for as often
                self.check_cancel()
                rate, eta = meter.update(hashing.hashed)
                self.log.progress(hashing.hashed, self.total_bytes, rate, eta, "hashing for the final pass")
        except BaseException:
            hashing.stop()
            raise
        self.hashing_ended = time.monotonic()
        hashed_alone = hashing.hashed - hashed_before
        if hashed_alone >= 16 << 20:  # enough to tell how fast the source reads with nothing beside
            self.read_rate = hashed_alone / max(time.monotonic() - waited_from, 1e-3)
        return files

    def wait_hands_off_ack(self):
        """Until MIG's runner has filed every line before HANDS_OFF, it may still write to the
        source's database: not a reason to wait with the hashing (the final pass fetches what
        it wrote), but with the stop. A runner that is gone never answers: then a while is
        enough."""
        ack = os.path.join(self.work_dir, protocol.HANDS_OFF_ACK_NAME)
        deadline = time.monotonic() + HANDS_OFF_WAIT
        while not os.path.exists(ack):
            if time.monotonic() >= deadline:
                self.log.event(
                    f"MIG did not confirm it leaves its volumes alone within {HANDS_OFF_WAIT:g}s: going on "
                    "(verify checks every entry against the stopped source)",
                    level="warning",
                )
                return
            time.sleep(0.05)

    def step_prepare_start(self):
        """Ready the target's start ahead of the stop (its interpreters up, their libraries
        imported: see Driver.prepare_start), so that its start, inside the downtime, is as
        short as an exec. Once the copy holds the app's code, beside the index, the budget's
        rounds and the live rounds, none of which uses the target's grid: it takes a while
        (imports), and is done before the arm (see prepared()). It imports libraries only, so
        a file the later passes change is never one it ran."""
        if self.action == "migrate":
            self.preparing = threading.Thread(target=self.prepare_start, name="prepare-start", daemon=True)
            self.preparing.start()

    def prepared(self):
        """Wait for the target's prepared start, if one is under way: nothing else may use
        the target's grid meanwhile (the stop, a rollback's removal, the end)."""
        if self.preparing is not None:
            self.preparing.join()
            self.preparing = None

    def prepare_start(self):
        # Only an optimisation: whatever goes wrong, the target starts afresh, and says why.
        try:
            prepared = self.target.prepare_start(self.target_app, wait=PREPARED_WAIT)
        except Exception as e:
            why = e if isinstance(e, GridError) else f"{type(e).__name__}: {e}"
            self.log.event(
                f"Could not prepare the start of {self.target_app}: {why}; it starts afresh", level="warning"
            )
            return
        said = [f"{', '.join(prepared.ready)} ready"] if prepared.ready else []
        said += [f"{name} will start afresh: {why}" for name, why in prepared.cold.items()]
        self.log.event(
            f"Prepared the start of {self.target_app} on {self.target_grid.name}: {'; '.join(said)}",
            ready=list(prepared.ready),
        )

    def step_live_pass(self):
        """The final pass once while the source runs, and verify after it: the passes after
        it then settle, and verify checks, only what changed since (sync.FinalPass). What
        verify finds now the next sweep describes again, whatever its fingerprint says."""
        self.log.event("Settling the copy while the source runs, so that the final pass has little to do")
        started = time.monotonic()
        what = "settling the copy while the source runs"
        files, received, entries, changing = self.live_round(started, what)
        self.log.event(
            f"Settled the copy while the source runs in {self.round_seconds:.1f}s: {files} "
            f"file(s) fetched ({human_bytes(received)} of changed blocks), {entries} entries verified, "
            f"{changing} of them changing meanwhile (looked at again)",
            files=files,
            changed_bytes=received,
            changing=changing,
            seconds=round(self.round_seconds, 3),
        )

    def step_live_sweeps(self):
        """Sweep the running source for what changed since the last look, and settle and
        verify that, until a sweep finds no less than three quarters of what the one before
        found: the sweep after the stop then finds what the app changed during the last of
        these (a second, say, with many files), not during the live pass (many seconds).
        None after a round shorter than RACY_MARGIN: there is little left to gain."""
        found_before = None
        for number in range(1, LIVE_SWEEPS + 1):
            if self.round_seconds < RACY_MARGIN:
                # The sweep after the stop finds what changed in less than this round took:
                # another round would cost about as much as it could save.
                return
            survey = self.live.scan
            if survey is None or survey.poll() is not None:
                return  # the connection dropped: the final pass lists the stopped source in full
            started = time.monotonic()
            files, received, _, changing = self.live_round(
                started, "settling what changed while the source runs", survey
            )
            found = self.live.described
            self.log.event(
                f"Swept the running source ({number} of {LIVE_SWEEPS} at most) in "
                f"{self.round_seconds:.1f}s: {found} entries changed since the last look, "
                f"{files} file(s) fetched ({human_bytes(received)}), {changing} changing meanwhile",
                files=files,
                changed_bytes=received,
                described=found,
                changing=changing,
                seconds=round(self.round_seconds, 3),
            )
            if found == 0 or (found_before is not None and found > found_before * 3 / 4):
                return
            found_before = found

    def live_round(self, started, what, survey=None):
        """The final pass while the source runs (the live pass; given the survey agent, a
        live sweep), then verify of what it settled; what differs (the app was writing to
        it) the next sweep describes again. Returns (files fetched, bytes received, entries
        verified, how many differed)."""
        self.live = sync.FinalPass(
            self.standby,
            self.volumes_path,
            self.index,
            self.clean_before_ns,
            self.pass_progress(started, what),
            self.bwlimit,
            survey=survey,
            forced=self.forced if survey is not None else (),
        )
        self.live.open()
        # The next pass's senders of changed blocks (this one's end with it) start now, and
        # are up by the time it needs them, not after it.
        self.standby.start(sync.Reader.DELTA, sync.Reader.DELTA)
        files, received = self.live.run(live=True)
        self.moved += received
        self.check_cancel()
        changing = set()
        swept = survey is not None
        entries, _ = sync.verify(self.volumes_path, self.index, swept=swept, problem_paths=changing)
        self.forced = changing
        self.round_seconds = time.monotonic() - started
        return files, received, entries, len(changing)

    def pass_progress(self, started, what):
        def on_progress(received):
            # How much changed is found as the source is listed: no total, no ETA.
            elapsed = max(time.monotonic() - started, 1e-3)
            self.log.progress(received, 0, received / elapsed, None, what)

        return on_progress

    def step_prepare_final(self):
        self.final = sync.FinalPass(
            self.standby,
            self.volumes_path,
            self.index,
            self.clean_before_ns,
            None,
            self.bwlimit,
            survey=self.live.scan,
            forced=self.forced,
        )
        self.final.open()

    def step_arm(self):
        self.prepared()
        self.wait_hands_off_ack()
        target = f"{self.target_grid.name}/{self.target_app}"
        heartbeat_driver = self.heartbeat_connection()
        try:
            self.retrying(
                lambda: self.source.arm_cutover(
                    self.source_app, self.job_uid, self.job_id, self.action, target, self.heartbeat_timeout
                ),
                "arming the cut-over",
            )
        except BaseException:
            if heartbeat_driver is not None:
                heartbeat_driver.close()
            raise
        self.armed = True
        self.heartbeat = Heartbeat(self, heartbeat_driver)
        self.log.event(
            f"Cut-over armed on {self.source_grid.name}: its watchdog restarts the source if this "
            f"helper is silent for {self.heartbeat_timeout:g}s before the decision is carried out",
            fact=protocol.ARMED,
        )

    def step_stop_source(self):
        self.apps["source"] = "stopping"
        message = f"Stopping the source app {self.source_app}"
        self.log.event(message, phase=protocol.STOPPING, fact=protocol.SOURCE_STOPPING)
        try:
            self.retrying(lambda: self.source.stop(self.source_app), "stopping the source")
        except GridError as e:
            raise Failure(f"the source app did not stop: {e}") from None
        self.apps["source"] = "stopped"
        self.log.event("Source stopped", fact=protocol.SOURCE_STOPPED)

    def step_final_sync(self):
        self.check_heartbeat()
        self.log.event("Final pass with the source stopped", phase=protocol.FINAL_SYNC)
        started = time.monotonic()
        self.final.on_progress = self.pass_progress(started, "final pass: changed blocks")
        files, received = self.final.run()
        seconds = time.monotonic() - started
        self.moved += received
        found = (
            "found by a sweep of the stopped source"
            if self.final.swept
            else "listing the stopped source in full (the live pass's survey had ended)"
        )
        self.log.event(
            f"Final pass: {files} file(s) changed since the copy was settled, {found}; "
            f"{human_bytes(received)} of changed blocks sent in {seconds:.1f}s",
            fact=protocol.FINAL_PASS_DONE,
            files=files,
            changed_bytes=received,
            seconds=round(seconds, 3),
        )

    def step_verify(self):
        self.check_heartbeat()
        self.log.event("Verifying the copy entry by entry", phase=protocol.VERIFYING)
        entries, problems = sync.verify(self.volumes_path, self.index, swept=self.final.swept)
        self.check_cancel()
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise Failure(f"verify failed, {len(problems)} difference(s): {shown}")
        self.verified = True
        which = (
            f"the {entries} entries changed since verified while the source ran"
            if self.final.swept
            else (f"{entries} entries")
        )
        self.log.event(
            f"Verified {which} against the stopped source: type, mode, owner, size, time, "
            "links, xattrs, sparseness and content",
            fact=protocol.VERIFIED,
        )

    def step_commit(self):
        self.check_heartbeat()
        self.check_cancel()  # the last moment a cancel rolls back
        record = self.claim(Decision.COMMIT, "the copy was verified against the stopped source")
        if record.decision != Decision.COMMIT:
            raise Failure(
                f"the cut-over was rolled back by the {record.decided_by} before this helper could "
                f"commit: {record.reason}"
            )

    def claim(self, decision, reason):
        record = self.retrying(
            lambda: self.source.claim_cutover(self.source_app, self.job_uid, decision, "helper", reason),
            "deciding the cut-over",
        )
        self.note_decision(record)
        return record

    def note_decision(self, record):
        reason = f": {record.reason}" if record.reason else ""
        self.log.event(
            f"Cut-over decided: {record.decision} (by the {record.decided_by}){reason}",
            fact=protocol.DECISION,
            decision=record.decision,
            by=record.decided_by,
        )

    def step_start(self):
        """Start the app that is the app from now on: the target (migrate) or the source."""
        if not self.verified:  # a bug, if ever: explicit, since `python -O` drops asserts
            raise Failure("nothing starts from an unverified copy (the helper's steps ran out of order)")
        self.refuse_late_cancel(COMMITTED)
        if self.action == "migrate":
            role, grid, config, app, url = (
                "target",
                self.target,
                self.target_grid,
                self.target_app,
                self.target_url,
            )
        else:
            self.apps["target"] = "stopped"
            role, grid, config, app, url = (
                "source",
                self.source,
                self.source_grid,
                self.source_app,
                self.source_url,
            )
        self.apps[role] = "starting"
        self.log.event(
            f"Starting {app} on {config.name}", phase=protocol.STARTING, fact=protocol.APP_STARTING
        )
        try:
            self.retrying(lambda: self.start_app(grid, app, url), f"starting {app}")
        except OperationFailed as e:
            if role == "target":
                # It never answered, so it took no writes: give it up, and the source may run.
                self.source.abandon_cutover(self.source_app, self.job_uid, "helper", f"failed to start: {e}")
                raise Failure(f"the target app failed to start: {e}") from None
            raise Failure(f"the source app failed to restart: {e}") from None
        except GridError as e:
            raise Failure(f"the {role} app could not be started: {e}") from None
        self.apps[role] = "running"
        warm = f" ({', '.join(self.started_warm)} from its prepared start)" if self.started_warm else ""
        self.log.event(f"{app} started on {config.name}{warm}", fact=protocol.APP_STARTED)
        self.heartbeat.stop()
        # The downtime ends at the first answer: nothing the source's grid does may delay it.
        self.wait_first_answer(url)
        try:
            self.source.close_cutover(self.source_app, self.job_uid)
        except GridError as e:
            # Once, not again and again: the decision is carried out, and closing only lets the
            # watchdog leave early (silent now, it finds the decision it must obey, and
            # leaves); MIG's finish clears the record.
            self.log.event(
                f"Could not close the cut-over record on {self.source_grid.name}: {e}; MIG's finish "
                "clears it",
                level="warning",
            )

    def start_app(self, grid, app, url):
        """Start an app, which has MIG in it: it counts as started once it listens where its
        grid publishes it (`url`), which is sooner and surer than its staying up a while."""
        result = grid.start(app, listen=True, timeout=LISTEN_TIMEOUT)
        self.started_warm = result.get("warm", [])
        if result.get("listening") is False:
            self.log.event(
                f"{app} runs, but nothing listens where its grid publishes it ({url}) after "
                f"{LISTEN_TIMEOUT:g}s",
                level="warning",
            )

    def wait_first_answer(self, url):
        """The downtime ends when the app first answers at its published URL: ask it."""
        if self.journal.has(protocol.APP_ANSWERED) or not url:
            return
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    pass
            except urllib.error.HTTPError as e:
                if e.code >= 500:
                    time.sleep(0.02)
                    continue
            except OSError:
                time.sleep(0.02)
                continue
            self.log.event(f"The app answered at {url}", fact=protocol.APP_ANSWERED, at=time.time(), url=url)
            return
        self.log.event(f"The app did not answer at {url} within {ANSWER_TIMEOUT:g}s", level="warning")

    # --- endings ------------------------------------------------------------------------

    def mark_finished(self):
        self.finished = True
        self.finished_at = time.monotonic()

    def status_gone(self):
        return self.finished_at is not None and time.monotonic() - self.finished_at > STATUS_AFTER_RESULT

    def succeed(self):
        self.refuse_late_cancel(COMMITTED)
        self.mark_finished()
        self.apps["helper"] = "done"
        what = "started" if self.action == "migrate" else "kept stopped; source restarted"
        self.log.event(
            f"Done: {self.target_grid.name}/{self.target_app} {what}",
            phase=protocol.FINISHING,
            fact=protocol.RESULT,
            result=protocol.Result.OK,
        )

    def fail(self, failure: protocol.Failure):
        """Roll back, then journal the result. The reason is written once, in words; what
        the tools said goes with it, in `failure`, for the page to show once."""
        # Cleanup must not be interrupted by a second SIGTERM, nor stopped by a full disk.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.log.strict = False
        cancelled = failure.cause == protocol.Cause.CANCELLED
        self.log.event(
            failure.summary,
            level="warning" if cancelled else "error",
            phase=protocol.ROLLING_BACK,
            fact=protocol.FAILING,
            failure=failure.to_dict(),
        )
        self.stop_readers()
        notes = self.roll_back(failure.summary)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        for level, message in notes:
            self.log.event(message, level=level)
        self.mark_finished()
        self.apps["helper"] = "cancelled" if cancelled else "failed"
        signal.signal(signal.SIGTERM, self.on_sigterm)
        result = protocol.Result.CANCELLED if cancelled else protocol.Result.FAILED
        self.log.event(
            "Rolled back: " + ("cancelled" if cancelled else "the job failed"),
            level="warning" if cancelled else "error",
            fact=protocol.RESULT,
            result=result,
            error=failure.summary,
            failure=failure.to_dict(),
            failed_during=failure.phase,
        )

    def roll_back(self, reason):
        """Decide rollback (unless a decision holds), restart the source first, then remove
        the target this job created. Returns (level, message) notes, journaled after: a
        full disk must not keep the source down."""
        notes = []
        record = None
        if self.armed:
            try:
                record = self.retrying(
                    lambda: self.source.claim_cutover(
                        self.source_app, self.job_uid, Decision.ROLLBACK, "helper", reason
                    ),
                    "deciding the cut-over",
                )
            except GridError as e:
                # Beat no more: the watchdog there decides, and restarts the source.
                if self.heartbeat is not None:
                    self.heartbeat.stop()
                return [
                    (
                        "error",
                        f"Could not reach {self.source_grid.name} to roll back: {e}; its watchdog rolls "
                        "back and restarts the source once this helper is silent",
                    )
                ]
            notes.append(("info", f"Cut-over decided: {record.decision} (by the {record.decided_by})"))
        if record is not None and not record.source_may_run:
            notes.append(
                (
                    "error",
                    f"The cut-over was committed: {self.source_app} stays stopped, and "
                    f"{self.target_grid.name}/{self.target_app} is the app; start it with "
                    f"`manage.py recover {self.job_id}`",
                )
            )
            return notes
        if self.source is not None:
            try:
                state = self.retrying(lambda: self.source.state(self.source_app), "reading the source")
                if state != AppState.RUNNING:
                    self.retrying(
                        lambda: self.start_app(self.source, self.source_app, self.source_url),
                        "restarting the source",
                    )
                    self.apps["source"] = "running"
                    notes.append(("info", f"Restarted the source app {self.source_app}"))
            except GridError as e:
                notes.append(("error", f"Could not restart the source app: {e}"))
        keep_copy = record is not None and record.decision == Decision.COMMIT and not record.abandoned
        if self.target_created and not keep_copy:
            self.prepared()
            try:
                result = self.target.destroy(self.target_app, owner=self.owner)
                leftovers = result.get("leftovers") or []
                note = f" (could not remove: {'; '.join(leftovers[:3])})" if leftovers else ""
                if not result.get("kept"):
                    self.apps["target"] = "removed"
                    notes.append(("info", f"Removed the partial target {self.target_app}{note}"))
            except GridError as e:
                notes.append(("error", f"Could not remove the partial target: {e}"))
        if record is not None:
            try:
                self.source.close_cutover(self.source_app, self.job_uid)
            except GridError as e:
                notes.append(("warning", f"Could not close the cut-over record: {e}"))
        return notes

    # --- copying ------------------------------------------------------------------------

    def copy_pass(self, label, fresh=False):
        """One rsync of the whole volumes/ directory, reporting progress; a pass whose
        connection broke is run again, with backoff (rsync moves only what is missing)."""
        for attempt, delay in enumerate((*RETRY_DELAYS, None), 1):
            try:
                return self.rsync_once(label, fresh)
            except CopyError as error:
                if delay is None or error.kind != CopyError.CONNECTION:
                    raise
                self.log.event(
                    f"{label}: {error}; trying again in {delay}s (attempt {attempt})", level="warning"
                )
                time.sleep(delay)

    def rsync_once(self, label, fresh=False):
        total = max(self.total_bytes, 1)
        meter = RateMeter(total)
        source = self.retrying(lambda: self.source.rsync_source(self.source_app), "reaching the source")

        def on_progress(done, percent):
            done = min(done, total)
            if fresh:
                self.moving = done
            rate, eta = meter.update(done)
            self.log.progress(done, total, rate, eta, label)

        argv = rsync_argv(
            source.path,
            f"{self.volumes_path}/",
            source.remote_shell,
            self.bwlimit,
            self.stall_timeout,
            protect_args=source.protect_args,
        )
        stats = run_rsync(argv, on_progress, self.stall_timeout, self.rsync_pid_file, self.check_cancel)
        self.log.progress(total, total, total / max(stats.seconds, 1e-3), 0, label, force=True)
        return stats


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mighelper", description="MIG's helper: copies one app.")
    parser.add_argument("--config", required=True, help="the job's config file (from MIG)")
    parser.add_argument("--work", required=True, help="directory for the progress log")
    args = parser.parse_args(argv)
    helper = Helper(args.config, args.work)
    try:
        return helper.run()
    finally:
        # Also on the SIGTERM that ends its lingering: its SSH master connection and that
        # connection's directory in /tmp go with it, not after it.
        helper.close()
