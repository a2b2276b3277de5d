"""The fault matrix: whatever dies at whatever moment, the app ends up running on exactly one
grid, no acknowledged write is lost, the job is finished or held with a reason, and the next
migration works.

Real processes, real sshd, real rsync; every fault is produced for real (kill -9, a killed
sshd, a full tmpfs). The app's data component acknowledges each write only once it is on
disk, in a log outside the app's volumes (conf/demo/datawriter.py).
"""

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from migrations_app.grids import AppState, OperationFailed, open_grid
from migrations_app.helper import protocol

from .conftest import needs_root
from .world import MANY_FILES, journal, many_files, processes, wait_for

HELPER = "MigHelper_shop"
UP = (AppState.RUNNING, AppState.STARTING)


class Watch:
    """Samples both grids while a fault plays out: were both copies ever up at once, and how
    long was neither up?"""

    def __init__(self, world):
        self.drivers = {name: open_grid(config, world.key) for name, config in world.configs.items()}
        self.both_up = []
        self.neither_since = None
        self.longest_neither = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def up(self, grid):
        driver = self.drivers[grid]
        try:
            return any(a.name == "shop" and a.state in UP for a in driver.list_apps())
        except Exception:  # a grid being faulted: no answer is no evidence either way
            return None

    def watch(self):
        while not self.stopping.wait(0.05):
            east, west = self.up("east"), self.up("west")
            if east is None or west is None:
                continue
            now = time.monotonic()
            if east and west:
                self.both_up.append(now)
            if east or west:
                if self.neither_since is not None:
                    self.longest_neither = max(self.longest_neither, now - self.neither_since)
                self.neither_since = None
            elif self.neither_since is None:
                self.neither_since = now

    def stop(self):
        self.stopping.set()
        self.thread.join()
        for driver in self.drivers.values():
            driver.close()


@pytest.fixture
def faulty(world, tmp_path, request):
    """An app with MIG inside on east whose writes are acknowledged in tmp_path/acks; from
    its start, both grids are watched: never may both run it."""
    acks = tmp_path / "acks"

    def provision(**kwargs):
        properties = {"ack_log": str(acks), **kwargs.pop("properties", {})}
        world.provision(properties=properties, **kwargs)
        world.watch = Watch(world)

    world.acks = acks
    world.watch = None
    world.provision_acked = provision
    yield world
    if world.watch is not None:
        world.watch.stop()
        print(f"\n{request.node.name}: no grid ran the app for at most {world.watch.longest_neither:.1f}s")
        assert not world.watch.both_up, "both copies of the app ran at once"


def running_grid(world):
    up = [grid for grid in ("east", "west") if world.running(grid, "shop")]
    assert len(up) == 1, f"the app runs on {up or 'no grid'}"
    return up[0]


def assert_nothing_lost(world):
    """The app runs on exactly one grid and holds every write it acknowledged."""
    grid = running_grid(world)
    lines = journal(world.volume(grid, "shop", "data") / "journal.log")
    counts = [count for _, count in lines]
    assert counts == list(range(1, len(counts) + 1)), "a write was lost or repeated"
    acked = {int(line.split()[1]) for line in world.acks.read_text().splitlines()}
    assert acked and acked <= set(counts), f"acknowledged but lost: {sorted(acked - set(counts))[:10]}"
    return grid


def settle(world, job_id=1, timeout=120):
    """Wait until the app runs somewhere and its job there is over; returns (grid, job)."""

    def over():
        for grid in ("east", "west"):
            if world.running(grid, "shop"):
                job = world.job(grid, "shop", job_id)
                if job and (job["state"] in ("done", "failed") or job["attention"]):
                    return grid, job
        return None

    found = wait_for(over, timeout, interval=0.2)
    assert found, (
        f"the job never ended: east {world.state('east', 'shop')}, west {world.state('west', 'shop')}"
    )
    return found


def migrate_on(world, grid):
    """The next migration, from wherever the app runs to the other grid, works. The many
    files that made a phase long enough to hit are deleted first, as an app deletes its
    files: what this migration shows is that the fault left nothing in its way."""
    other = "west" if grid == "east" else "east"
    for path in world.volume(grid, "shop", "data").glob(MANY_FILES):
        path.unlink()
    result = world.manage(
        grid, "shop", "migrate_app", "--yes", other, "shop", "--action", "migrate", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_for(lambda: world.running(other, "shop"), 60)
    assert world.wait_job(other, "shop", 2)["state"] == "done"
    assert_nothing_lost(world)


def start_migration(world, bwlimit=None):
    args = ["migrate_app", "--yes", "west", "shop", "--action", "migrate"]
    result = world.manage("east", "shop", *args, *(["--bwlimit", str(bwlimit)] if bwlimit else []))
    assert result.returncode == 0, result.stdout + result.stderr


def set_mig_env(world, grid="east", **values):
    """Settings for the app's MIG on `grid` (its mig.env, which travels with the app);
    a value of None removes one."""
    env_file = world.app_dir(grid, "shop") / "volumes/config/mig.env"
    lines = [line for line in env_file.read_text().splitlines() if line.split("=")[0] not in values]
    lines += [f"{k}='{v}'" for k, v in values.items() if v is not None]
    env_file.write_text("".join(f"{line}\n" for line in lines))


def wait_journal(world, predicate, timeout=120):
    assert wait_for(
        lambda: any(predicate(line) for line in world.helper_log("west", HELPER)), timeout, 0.01
    ), "the helper never got there"


# When to kill the helper: the first journal line that says it is in this phase.
PHASES = {
    "precopy": lambda line: line["kind"] == "progress",
    "stopping": lambda line: line.get("fact") == "source_stopping",
    "final_sync": lambda line: line.get("phase") == "final_sync",
    "verifying": lambda line: line.get("phase") == "verifying",
    "starting": lambda line: line.get("fact") == "app_starting",
    "finishing": lambda line: line.get("fact") == "result",
}


@pytest.mark.parametrize("phase", PHASES, ids=list(PHASES))
def test_helper_killed(faulty, phase):
    """kill -9 the helper: its grid starts it again, and it carries on from its journal."""
    world = faulty
    # The pre-copy is long by its bandwidth limit; the final pass's sweep, by many files.
    # Other phases are hit at their first line, however short they are.
    world.provision_acked(fill=many_files if phase == "final_sync" else None, padding=2 << 20)
    start_migration(world, bwlimit=2000 if phase == "precopy" else None)
    wait_journal(world, PHASES[phase])
    world.kill_helper("west", HELPER)
    grid, job = settle(world)
    decisions = [
        line["decision"] for line in world.filed_journal(grid, "shop", 1) if line.get("fact") == "decision"
    ]
    decision = decisions[-1] if decisions else None
    if decision == "commit" or phase == "precopy":
        assert (grid, job["state"]) == ("west", "done"), job
        assert world.state("east", "shop") is None
    else:
        # Stopped, not yet decided: the restarted helper rolls back, the source runs again.
        assert (grid, job["state"]) == ("east", "failed"), job
        assert "the helper died before the cut-over was decided, so it was rolled back" in job["error"]
        assert job["failure_cause"] == "helper lost"
        assert world.state("west", "shop") is None
    assert world.state("west", HELPER) is None
    migrate_on(world, assert_nothing_lost(world))


def test_helper_gone_for_good_after_the_stop(faulty):
    """The helper and its supervisor die together once the source has stopped, and so has
    MIG's runner with it (here started from a terminal, it outlives the app: killed, as it
    would have been): the watchdog on the source grid rolls back once the heartbeat is
    silent, and restarts the source, whose MIG ends the job."""
    world = faulty
    world.provision_acked()
    # Frozen the moment the source has stopped (a kill there, not in a window after it).
    set_mig_env(world, MIG_HEARTBEAT_TIMEOUT=3, MIG_HELPER_FREEZE_AFTER=protocol.SOURCE_STOPPED)
    start_migration(world)
    wait_journal(world, lambda line: line.get("fact") == protocol.SOURCE_STOPPED)
    world.kill_helper_app("west", HELPER)
    for pid in processes(b"run_job", cwd=world.app_dir("east", "shop") / "volumes/code"):
        os.kill(pid, signal.SIGKILL)
    grid, job = settle(world)
    assert (grid, job["state"]) == ("east", "failed"), job
    assert "rolled back by the watchdog" in job["error"] and "no sign of life" in job["error"]
    assert world.state("west", "shop") is None and world.state("west", HELPER) is None
    assert world.watch.longest_neither < 60
    set_mig_env(world, MIG_HELPER_FREEZE_AFTER=None)
    migrate_on(world, assert_nothing_lost(world))


def test_helper_gone_for_good_between_commit_and_start_is_recovered(faulty):
    """The helper app dies whole between the commit and the target's start: nothing may
    start the source, and nothing starts the target by itself. `recover` does, from the
    source's MIG; the target's MIG then finishes the job."""
    world = faulty
    world.provision_acked()
    # Frozen the moment it has journaled its commit, then killed.
    set_mig_env(world, MIG_HELPER_FREEZE_AFTER=protocol.DECISION)
    start_migration(world)
    wait_journal(world, lambda line: line.get("fact") == protocol.DECISION)
    world.kill_helper_app("west", HELPER)
    east = world.drivers["east"]
    assert east.read_cutover("shop").decision == "commit"
    with pytest.raises(OperationFailed, match="refusing to start shop: it moved to west/shop"):
        east.start("shop")
    recovered = world.manage("east", "shop", "recover", "1")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "started west/shop: its MIG finishes the job" in recovered.stdout
    grid, job = settle(world)
    assert (grid, job["state"]) == ("west", "done"), job
    set_mig_env(world, "west", MIG_HELPER_FREEZE_AFTER=None)
    migrate_on(world, assert_nothing_lost(world))


def test_source_mig_killed_during_precopy(faulty):
    """MIG dies inside the source app while the helper copies: the move goes on without it."""
    world = faulty
    world.provision_acked(padding=4 << 20)
    start_migration(world, bwlimit=2000)
    wait_journal(world, PHASES["precopy"])
    mig = int((world.app_dir("east", "shop") / "run/mig.pid").read_text().split()[0])
    os.kill(mig, signal.SIGKILL)
    grid, job = settle(world)
    assert (grid, job["state"]) == ("west", "done"), job
    migrate_on(world, assert_nothing_lost(world))


def test_target_mig_killed_right_after_it_first_answers(faulty):
    """MIG dies in the target right after it answers: its startup, already on its way,
    finishes the job; restarting the app brings MIG back."""
    world = faulty
    world.provision_acked()
    # The helper may never see the answer the test saw: the target's startup need not wait
    # the default minute for its last word, the cut-over record says enough.
    env_file = world.app_dir("east", "shop") / "volumes/config/mig.env"
    env_file.write_text(env_file.read_text() + "MIG_HELPER_WAIT='3'\n")
    start_migration(world)
    assert wait_for(
        lambda: world.state("west", "shop") == AppState.RUNNING and world.answering("west"), 60, 0.01
    )
    mig = int((world.app_dir("west", "shop") / "run/mig.pid").read_text().split()[0])
    os.kill(mig, signal.SIGKILL)
    # Its startup finishes the job, then nothing of MIG runs there: the app has failed.
    assert wait_for(lambda: world.state("west", "shop") == AppState.FAILED, 60)
    world.drivers["west"].start("shop")  # the operator brings the failed component back
    grid, job = settle(world)
    assert (grid, job["state"]) == ("west", "done"), job
    assert world.state("east", "shop") is None
    migrate_on(world, assert_nothing_lost(world))


@contextmanager
def sshd_down(host):
    """The host's sshd dead, with every connection it served, until the block ends."""
    host.crash()
    try:
        yield
    finally:
        host.restart()


def test_target_sshd_killed_and_restarted(faulty, ssh_hosts):
    """The target host's sshd dies with every connection during the pre-copy, and comes back:
    MIG follows the helper again, and the move finishes."""
    world = faulty
    world.provision_acked(padding=4 << 20)
    start_migration(world, bwlimit=1500)
    wait_journal(world, PHASES["precopy"])
    with sshd_down(ssh_hosts[1]):
        time.sleep(2)  # the fault lasts a while: MIG's follower finds the host gone
    grid, job = settle(world)
    assert (grid, job["state"]) == ("west", "done"), job
    messages = [e["message"] for e in world.events("west", "shop", 1)]
    assert any("Lost the helper's progress" in m for m in messages), messages
    migrate_on(world, assert_nothing_lost(world))


def test_the_source_hashing_killed_beside_the_copy(faulty):
    """The agent hashing the source beside the copy dies (kill -9) while rsync still
    copies: the copy goes on, the source is hashed again once it is done, and the move
    finishes."""
    world = faulty
    world.provision_acked(padding=4 << 20, fill=many_files)  # hashing 20,000 files takes a while
    start_migration(world, bwlimit=1500)
    volumes = world.app_dir("east", "shop") / "volumes"
    east_root = str(volumes.parent.parent.parent).encode()

    def hashing_now():
        """The hashing agent, once it walks the volumes (before its go, a kill would only
        have it replaced by another, as any agent that ended before its step)."""
        for pid in processes(b"\0scan\0", b"--hashes", east_root):
            try:
                if any(os.readlink(fd).startswith(str(volumes)) for fd in Path(f"/proc/{pid}/fd").iterdir()):
                    return pid
            except OSError:
                continue
        return None

    pid = wait_for(hashing_now, 60, interval=0.005)
    assert pid, "no agent hashed the source"
    os.kill(pid, signal.SIGKILL)
    grid, job = settle(world)
    assert (grid, job["state"]) == ("west", "done"), job
    said = [line.get("message", "") for line in world.filed_journal("west", "shop", 1)]
    assert any(m.startswith("The hashing beside the copy stopped") for m in said), said
    assert any(m.startswith("Hashed ") for m in said)
    assert_nothing_lost(world)


def test_source_sshd_killed_during_the_copy(faulty, ssh_hosts):
    """The source host's sshd dies with the helper's connections in the middle of the copy:
    the helper tries the pass again, with backoff, and the move finishes."""
    world = faulty
    world.provision_acked(padding=4 << 20)
    start_migration(world, bwlimit=1500)
    wait_journal(world, PHASES["precopy"])
    with sshd_down(ssh_hosts[0]):
        wait_journal(world, lambda line: "trying again in" in line.get("message", ""), 60)
    grid, job = settle(world)
    assert (grid, job["state"]) == ("west", "done"), job
    migrate_on(world, assert_nothing_lost(world))


def test_source_sshd_down_while_the_target_finishes(faulty, ssh_hosts):
    """The source host's sshd dies as the target starts: the target's MIG cannot finish the
    job, says so, and finishes it by itself once the host is back; nothing restarts."""
    world = faulty
    world.provision_acked()
    start_migration(world)
    wait_journal(world, lambda line: line.get("fact") == "app_started")
    log = world.app_dir("west", "shop") / "logs/mig.log"
    with sshd_down(ssh_hosts[0]):
        assert wait_for(lambda: "trying again in" in log.read_text(), 60), log.read_text()
    grid, job = settle(world)
    assert (grid, job["state"]) == ("west", "done"), job
    assert world.state("east", "shop") is None
    assert log.read_text().count("starting mig") == 1, "MIG was restarted to finish"
    # The source's host being down delays neither the first answer nor the downtime's record
    # (the helper retried closing the cut-over for half a minute before it asked the app).
    assert json.loads(job["timings"])["health"] < 15, job["timings"]
    migrate_on(world, assert_nothing_lost(world))


def mount_tmpfs(path, size):
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    return lambda: subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path):
    """Fill the file system at `path` to the last byte."""
    with open(path / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@needs_root
def test_target_disk_full_during_the_copy(faulty):
    world = faulty
    world.provision_acked(padding=8 << 20)
    unmount = mount_tmpfs(world.app_dir("west", "shop") / "volumes/data", "2m")
    try:
        result = world.manage(
            "east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate", "--wait"
        )
        assert result.returncode != 0
        grid, job = settle(world)
        assert (grid, job["state"]) == ("east", "failed"), job
        assert "failed: disk full on west" in job["error"], job["error"]
        assert job["failure_cause"] == "disk full" and "rsync failed" in job["error_detail"], job
        assert world.state("west", "shop") is None
    finally:
        unmount()
    migrate_on(world, assert_nothing_lost(world))


@pytest.fixture
def small_target_config(faulty):
    """The acknowledging app on east, and a 16 MiB tmpfs where its copy's config volume goes."""
    faulty.provision_acked()
    config = faulty.app_dir("west", "shop") / "volumes/config"
    unmount = mount_tmpfs(config, "16m")
    yield config
    unmount()


@needs_root
def test_target_config_volume_full_before_the_start(faulty, small_target_config):
    """The target's config volume is full when it starts: its MIG cannot open its database
    and says why; the target never answered, so it is given up and the source runs again."""
    world = faulty
    start_migration(world)
    # Verified and decided, not yet started: nothing writes to the copy any more.
    wait_journal(world, lambda line: line.get("fact") == "decision")
    fill(small_target_config)
    grid, job = settle(world)
    assert (grid, job["state"]) == ("east", "failed"), job
    assert job["error"].startswith("Starting failed: disk full on west"), job["error"]
    assert "the target app failed to start" in job["error_detail"]
    assert "disk full on west (MIG's config volume" in job["error_detail"], job["error_detail"]
    migrate_on(world, assert_nothing_lost(world))


def startup_of(world, grid):
    """The pid of the background `startup --keep-trying` of MIG in shop on `grid`."""
    found = processes(b"startup\0--keep-trying", cwd=world.app_dir(grid, "shop") / "volumes/code")
    return found[0] if found else None


@needs_root
def test_target_config_volume_full_right_after_the_start(faulty, small_target_config):
    """The target's config volume fills up as its MIG starts: MIG answers, cannot record the
    end of the job, says "disk full" and tries again; once there is room, the job ends."""
    world = faulty
    start_migration(world)
    wait_journal(world, lambda line: line.get("fact") == "app_started")
    # MIG's background startup is still loading Django: hold it while the disk fills.
    startup = startup_of(world, "west")
    assert startup, "no startup process in the target's MIG"
    os.kill(startup, signal.SIGSTOP)
    fill(small_target_config)
    os.kill(startup, signal.SIGCONT)
    assert wait_for(lambda: world.answering("west"), 60)
    log = world.app_dir("west", "shop") / "logs/mig.log"
    assert wait_for(lambda: "disk full on west (MIG's config volume" in log.read_text(), 60), log.read_text()
    assert world.state("east", "shop") == AppState.STOPPED  # committed: it never comes back
    assert_nothing_lost(world)
    (small_target_config / "filler").unlink()
    grid, job = settle(world)
    assert (grid, job["state"]) == ("west", "done"), job
    migrate_on(world, grid)
