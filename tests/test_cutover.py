"""The cut-over record and its watchdog, on every driver and transport (part of the grid
contract); a hostgrid's supervised components, on real hostgrids (local and ssh).

What "never both, never neither" rests on at the grid: one decision made once, a start that
refuses to run a source that moved, a watchdog that restarts a source whose helper went
silent, and a supervisor that restarts a helper that died.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from migrations_app.grids import AppState, OperationFailed

from .world import wait_for

SLEEPER = ["{python}", "-c", "import time\nwhile True: time.sleep(1)"]
JOB = "c0ffee"


def define_sleeper(grid, name="shop", restarts=0, command=SLEEPER):
    component = {"name": "main", "command": command}
    if restarts:
        component["restarts"] = restarts
    grid.define(name, {"volumes": ["data"], "components": [component], "start_settle": 0.1})


def arm(grid, app="shop", action="migrate", timeout=30.0, job=JOB):
    return grid.arm_cutover(app, job, 7, action, "west/shop", timeout)


def test_one_decision_and_the_start_guard(any_grid):
    grid = any_grid
    define_sleeper(grid)
    grid.start("shop")
    armed = arm(grid)
    assert (armed.job, armed.job_id, armed.action, armed.decision) == (JOB, 7, "migrate", None)
    assert armed.watchdog and armed.heartbeat_age < 5
    grid.stop("shop")
    # Armed and undecided: nobody may start the source.
    with pytest.raises(OperationFailed, match="a cut-over \\(job #7\\) is under way"):
        grid.start("shop")

    committed = grid.claim_cutover("shop", JOB, "commit", "helper", "verified")
    assert (committed.decision, committed.decided_by, committed.reason) == ("commit", "helper", "verified")
    # A later claim gets the decision that holds, not its own.
    late = grid.claim_cutover("shop", JOB, "rollback", "watchdog", "too late")
    assert (late.decision, late.decided_by) == ("commit", "helper")
    assert late.moved and not late.source_may_run
    with pytest.raises(OperationFailed, match="it moved to west/shop .*recover 7 --give-up-target"):
        grid.start("shop")
    assert grid.state("shop") == AppState.STOPPED

    given_up = grid.abandon_cutover("shop", JOB, "operator", "target never started")
    assert given_up.abandoned and given_up.source_may_run and not given_up.moved
    grid.start("shop")
    assert grid.state("shop") == AppState.RUNNING
    assert grid.close_cutover("shop", JOB).closed
    assert wait_for(lambda: not grid.read_cutover("shop").watchdog, 10), "the watchdog did not leave"
    assert grid.clear_cutover("shop", JOB) is True
    assert grid.read_cutover("shop") is None
    assert grid.clear_cutover("shop", JOB) is False  # idempotent


def test_a_snapshot_commit_lets_the_source_run(any_grid):
    grid = any_grid
    define_sleeper(grid)
    arm(grid, action="snapshot")
    grid.claim_cutover("shop", JOB, "commit", "helper")
    grid.start("shop")
    assert grid.state("shop") == AppState.RUNNING


def test_operations_refuse_another_jobs_record(any_grid):
    grid = any_grid
    define_sleeper(grid)
    arm(grid)
    with pytest.raises(OperationFailed, match="cut-over of job #7 is not finished"):
        arm(grid, job="other")
    with pytest.raises(Exception, match="no cut-over record for this job"):
        grid.claim_cutover("shop", "other", "commit", "helper")
    with pytest.raises(Exception, match="did not commit"):
        grid.abandon_cutover("shop", JOB, "operator")
    grid.claim_cutover("shop", JOB, "rollback", "helper")
    # A decided rollback is finished business: a new job's record replaces it.
    assert arm(grid, job="other").job == "other"


def claim_in_processes(grid, decisions):
    """Claim from several processes at once, each its own agent; returns what each got."""
    code = (
        "import json, sys\n"
        "from migrations_app.grids import gridinfo, open_grid\n"
        "config = gridinfo.GridConfig.from_table('east', json.loads(sys.argv[1]))\n"
        "with open_grid(config, sys.argv[2]) as grid:\n"
        "    state = grid.claim_cutover('shop', sys.argv[3], sys.argv[4], f'claimant-{sys.argv[4]}')\n"
        "print(state.decision, state.decided_by)\n"
    )
    table = json.dumps(grid.grid.to_table())
    key = str(grid.transport.key_file) if hasattr(grid.transport, "key_file") else ""
    root = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, table, key, JOB, decision],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for decision in decisions
    ]
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        answers.append(out.strip())
    return answers


def test_concurrent_claims_agree_on_one_winner(any_grid):
    grid = any_grid
    define_sleeper(grid)
    arm(grid)
    answers = claim_in_processes(grid, ["commit", "rollback"] * 4)
    assert len(set(answers)) == 1, answers
    decision, by = answers[0].split()
    assert by == f"claimant-{decision}"
    assert grid.read_cutover("shop").decision == decision


def test_watchdog_restarts_a_source_whose_helper_went_silent(any_grid):
    grid = any_grid
    define_sleeper(grid)
    grid.start("shop")
    arm(grid, timeout=1.0)
    grid.stop("shop")
    # Nobody beats: after a second the watchdog rolls back and starts the source.
    assert wait_for(lambda: grid.state("shop") == AppState.RUNNING, 20), "the source was not restarted"
    state = grid.read_cutover("shop")
    assert (state.decision, state.decided_by) == ("rollback", "watchdog")
    assert "no sign of life" in state.reason
    assert wait_for(lambda: not grid.read_cutover("shop").watchdog, 10)
    log, _ = grid.read_file("shop", "cutover/watchdog.log")
    assert "started shop" in log


def test_watchdog_keeps_a_committed_source_stopped(any_grid):
    grid = any_grid
    define_sleeper(grid)
    arm(grid, timeout=1.0)
    grid.claim_cutover("shop", JOB, "commit", "helper")
    assert wait_for(lambda: not grid.read_cutover("shop").watchdog, 20)
    log, _ = grid.read_file("shop", "cutover/watchdog.log")
    assert "committed: the target is the app now; not starting the source" in log
    assert grid.state("shop") == AppState.STOPPED


def test_watchdog_restarts_the_source_of_a_committed_snapshot(any_grid):
    grid = any_grid
    define_sleeper(grid)
    arm(grid, action="snapshot", timeout=1.0)
    grid.claim_cutover("shop", JOB, "commit", "helper")
    assert wait_for(lambda: grid.state("shop") == AppState.RUNNING, 20)


def test_watchdog_waits_while_the_heartbeat_goes_on(any_grid):
    grid = any_grid
    define_sleeper(grid)
    arm(grid, timeout=1.5)
    for _ in range(8):  # longer than the timeout, in beats shorter than it
        grid.beat_cutover("shop", JOB)
        assert grid.read_cutover("shop").decision is None
        wait_for(lambda: False, 0.4)
    grid.close_cutover("shop", JOB)
    assert wait_for(lambda: not grid.read_cutover("shop").watchdog, 10)
    assert grid.read_cutover("shop").decision is None


def dead(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def start_supervised(grid, restarts):
    """A sleeper under a supervisor allowed `restarts`; returns (supervisor, component)."""
    define_sleeper(grid, restarts=restarts)
    grid.start("shop")
    supervisor = grid.describe("shop", sizes=False).components[0].pid
    assert wait_for(lambda: len(children(supervisor)) == 1, 20), "no component under the supervisor"
    return supervisor, children(supervisor)[0]


def test_a_supervised_component_is_restarted_a_bounded_number_of_times(grid):
    supervisor, _ = start_supervised(grid, restarts=2)
    for attempt in range(3):
        assert wait_for(lambda: len(children(supervisor)) == 1, 20), "no component under the supervisor"
        (child,) = children(supervisor)
        os.kill(child, signal.SIGKILL)
        if attempt < 2:
            assert wait_for(lambda c=child: children(supervisor) not in ([], [c]), 20)
            assert grid.state("shop") == AppState.RUNNING
    # The third death is one too many: the supervisor gives up and the app has failed.
    assert wait_for(lambda: grid.state("shop") == AppState.FAILED, 20)
    log = Path(grid.grid.root, "apps/shop/logs/main.log").read_text()
    assert "restart 1 of 2" in log and "restart 2 of 2" in log and "giving up" in log


def test_a_stopped_supervised_component_is_not_restarted(grid):
    _, child = start_supervised(grid, restarts=3)
    grid.stop("shop")
    assert grid.state("shop") == AppState.STOPPED
    assert dead(child)
    assert "restart" not in Path(grid.grid.root, "apps/shop/logs/main.log").read_text()


def test_a_component_runs_while_anything_in_its_session_does(grid):
    # Its supervisor killed, the component itself at work: the app still runs, and a stop
    # still reaches what runs.
    supervisor, child = start_supervised(grid, restarts=1)
    os.kill(supervisor, signal.SIGKILL)
    assert wait_for(lambda: dead(supervisor), 10)
    assert grid.state("shop") == AppState.RUNNING
    assert grid.describe("shop", sizes=False).components[0].pid == child
    grid.stop("shop")
    assert grid.state("shop") == AppState.STOPPED
    assert wait_for(lambda: dead(child), 10)
