"""Self-migration end to end: real sshd, real rsync, real processes, MIG inside the app.

Each test provisions an app with MIG inside on grid `east`, runs `migrate_app` from the
app's own code volume with the app's environment, and checks every grid afterwards.
"""

import json
import os
import signal
import subprocess

import pytest

from migrations_app import catalog

from .world import PYTHON, journal, many_files, tree, wait_for

HELPER = "MigHelper_shop"


def template_code():
    files, _ = catalog.mig_app_template(PYTHON)
    return {k.removeprefix("volumes/code/"): v for k, v in files.items() if k.startswith("volumes/code/")}


def assert_journal_continues(lines, source, target):
    """The source's writes, all of them in order, then the target's, carrying on the count."""
    counts = [count for where, count in lines]
    assert counts == list(range(1, len(counts) + 1)), "a write was lost or repeated"
    places = [where for where, count in lines]
    switch = places.index(target) if target in places else len(places)
    assert set(places[:switch]) == {source} and set(places[switch:]) <= {target}
    return switch


def event_messages(world, grid, app, job_id):
    return [e["message"] for e in world.events(grid, app, job_id)]


def test_migrate(world):
    world.provision()
    secret_key = (world.app_dir("east", "shop") / "volumes/config/secret_key").read_bytes()

    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[verifying] Verified" in result.stdout
    assert f"MIG answers at {world.url('west')}" in result.stdout

    job = world.wait_job("west", "shop", 1)
    assert job["state"] == "done", job
    assert world.running("west", "shop") and world.answering("west")
    assert world.state("east", "shop") is None, "the source app should be destroyed"
    assert world.state("west", HELPER) is None, "the helper should be destroyed"
    assert world.locks("west", "shop") == []

    # Every file that does not change by itself travelled byte for byte.
    target = world.app_dir("west", "shop") / "volumes"
    assert tree(target / "code") == template_code()
    config = tree(target / "config")
    assert config["secret_key"] == secret_key
    assert config["grid.info"].decode() == world.grid_info
    assert config["id_ed25519"] == world.key.read_bytes()
    # The data component kept writing during the copy; none of its writes was lost.
    switch = assert_journal_continues(journal(target / "data/journal.log"), "east/shop", "west/shop")
    assert switch > 0

    # The job's history moved with the app: events from the source, the helper and the target.
    messages = event_messages(world, "west", "shop", 1)
    assert messages[0].startswith("Lock taken by") and messages[0].endswith("(command line).")
    for expected in ("Provisioned MigHelper_shop on west", "Source stopped", "Destroyed the source app shop"):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    assert messages[-1] == "Migration complete: shop runs on west"
    assert job["source_stopped"] and job["app_up"] and job["app_up"] > job["source_stopped"]
    # MIG's start was prepared before the stop (its libraries imported); the data writer's not.
    assert (
        "Prepared the start of shop on west: mig ready; data will start afresh: its manifest names no "
        "modules to preload" in messages
    ), messages
    assert "shop started on west (mig from its prepared start)" in messages
    # Nothing went wrong with the heartbeat: it beat through the connection opened for it as
    # the copy began (if that was up by the arm) or through one of its own.
    warnings = [e["message"] for e in world.filed_journal("west", "shop", 1) if e.get("level") == "warning"]
    assert not [w for w in warnings if "heartbeat" in w.lower()], warnings
    # The running source is swept again only after a live round of a second or more.
    events = world.events("west", "shop", 1)
    live_pass = next(e for e in events if e["message"].startswith("Settled the copy while the source runs"))
    swept = any(m.startswith("Swept the running source") for m in messages)
    assert swept == (json.loads(live_pass["data"])["seconds"] >= 1.0), messages

    # Running startup again changes nothing.
    again = world.manage("west", "shop", "startup")
    assert "nothing to do" in again.stdout, again.stdout + again.stderr


def test_snapshot(world):
    world.provision()
    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "shop-copy", "--action", "snapshot", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr

    assert world.wait_answering("east")
    job = world.wait_job("east", "shop", 1)
    assert job["state"] == "done", job
    assert world.running("east", "shop")
    assert world.state("west", "shop-copy") == "stopped"
    assert world.state("west", HELPER) is None
    assert world.locks("east", "shop") == []
    assert job["app_up"] > job["source_stopped"]

    source = world.app_dir("east", "shop") / "volumes"
    copy = world.app_dir("west", "shop-copy") / "volumes"
    assert tree(copy / "code") == tree(source / "code")
    source_config, copy_config = tree(source / "config"), tree(copy / "config")
    for name in ("grid.info", "mig.env", "id_ed25519", "secret_key"):
        assert copy_config[name] == source_config[name]
    # The copy is the source as it was when stopped; the source wrote on after its restart.
    copied, live = journal(copy / "data/journal.log"), journal(source / "data/journal.log")
    assert copied == live[: len(copied)] and len(live) > len(copied)
    assert int((copy / "data/counter.txt").read_text()) == copied[-1][1]
    assert event_messages(world, "east", "shop", 1)[-1].startswith("Snapshot complete")


def test_snapshot_to_the_same_grid_under_another_name(world):
    world.provision()
    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "east", "shop2", "--action", "snapshot", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert world.wait_answering("east")
    assert world.wait_job("east", "shop", 1)["state"] == "done"
    assert world.running("east", "shop")
    assert world.state("east", "shop2") == "stopped"
    assert world.state("east", "MigHelper_shop2") is None
    assert world.locks("east", "shop") == []


def test_manually_started_snapshot_copy_clears_its_stale_lock(world):
    world.provision()
    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "copy", "--action", "snapshot", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert world.wait_job("east", "shop", 1)["state"] == "done"
    # The copy carries the lock as it was at the final pass.
    assert len(world.locks("west", "copy")) == 1
    east_apps = [(a.name, a.state) for a in world.drivers["east"].list_apps()]

    world.drivers["west"].start("copy")
    assert world.wait_answering("west")
    # MIG answers first, then finishes what the lock says in the background.
    assert wait_for(lambda: world.locks("west", "copy") == [], 30)
    messages = event_messages(world, "west", "copy", 1)
    assert "This is the snapshot copy, started by hand" in messages[-1]
    # Nothing remote: the source grid is as it was, and no helper came back.
    assert [(a.name, a.state) for a in world.drivers["east"].list_apps()] == east_apps
    assert world.state("west", "MigHelper_copy") is None


def assert_failed_cleanly(world, job_id, summary, detail="", target_app="shop"):
    """The source runs, nothing this job created is left on the target, the job says why:
    in one line (`summary`, naming the phase and the cause), and what the tools said."""
    assert world.wait_answering("east")
    job = world.wait_job("east", "shop", job_id)
    assert job["state"] == "failed", job
    assert summary in job["error"] and "\n" not in job["error"], job["error"]
    assert detail in job["error_detail"], job["error_detail"]
    assert world.running("east", "shop")
    assert world.state("west", target_app) is None
    assert world.state("west", f"MigHelper_{target_app}") is None
    assert world.locks("east", "shop") == []
    return job


def make_unwritable(path):
    """A directory nobody can write, root included: a read-only mount (or mode 0555)."""
    path.mkdir(parents=True)
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=True)
        return lambda: subprocess.run(["umount", str(path)], check=False)
    path.chmod(0o555)
    return lambda: path.chmod(0o755)


def test_target_volume_not_writable(world):
    world.provision()
    restore = make_unwritable(world.app_dir("west", "shop") / "volumes" / "data")
    try:
        result = world.manage(
            "east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate", "--wait"
        )
        assert result.returncode != 0
        assert "failed" in result.stderr
        # Whichever pass meets the volume first (rsync, or the final pass), the reason is one.
        reason = "read-only file system on west" if os.geteuid() == 0 else "permission denied on west"
        job = assert_failed_cleanly(world, 1, reason)
        assert job["failure_cause"] in ("read-only file system", "permission denied"), job
    finally:
        restore()
    # What the job created is gone; only the directory the test made remains, empty.
    leftovers = [p for p in world.app_dir("west", "shop").rglob("*") if p.is_file()]
    assert leftovers == []


def test_helper_killed_during_precopy_resumes_and_finishes(world):
    world.provision(padding=4 << 20)
    launched = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate", "--bwlimit", "800"
    )
    assert launched.returncode == 0, launched.stderr
    assert wait_for(lambda: any(line["kind"] == "progress" for line in world.helper_log("west", HELPER)), 30)
    world.kill_helper("west", HELPER)
    job = world.wait_job("west", "shop", 1, timeout=120)
    assert job["state"] == "done", job
    assert world.running("west", "shop") and world.state("east", "shop") is None
    facts = [line.get("fact") for line in world.filed_journal("west", "shop", 1)]
    assert "resumed" in facts
    # The resumed pre-copy defined nothing twice, and the data arrived whole.
    assert facts.count("target_defining") == 2 and facts.count("result") == 1
    assert_journal_continues(
        journal(world.app_dir("west", "shop") / "volumes/data/journal.log"), "east/shop", "west/shop"
    )


def test_helper_gone_for_good_before_the_stop(world):
    # MIG stopped writing to its volumes for the final pass, but the source never stopped,
    # and the helper app died whole (its supervisor too): MIG runs on, so its runner must
    # finish the job here.
    world.provision(fill=many_files)  # hashing them takes a while: time to act in between
    launched = world.manage("east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate")
    assert launched.returncode == 0, launched.stderr

    def hands_off():
        return any(line.get("fact") == "hands_off" for line in world.helper_log("west", HELPER))

    assert wait_for(hands_off, 60, interval=0.01)
    world.kill_helper_app("west", HELPER)
    job = assert_failed_cleanly(world, 1, "Pre-copy failed: the helper stopped before it reported a result")
    assert job["source_stopped"] is None and job["failure_cause"] == "helper lost"


def test_a_downtime_predicted_over_its_budget_ends_the_job_before_the_stop(world):
    world.provision()
    args = ["--action", "migrate", "--max-downtime", "0.001", "--wait"]
    result = world.manage("east", "shop", "migrate_app", "--yes", "west", "shop", *args)
    plan = "downtime budget: 0.001 s; if the helper predicts more before the stop, the job ends"
    assert plan in result.stdout
    job = assert_failed_cleanly(world, 1, "The downtime would be about ")
    why = "over the budget of 0.001s, so the cut-over did not begin and the source app kept running"
    assert why in job["error"]
    assert job["failure_cause"] == "over the downtime budget" and job["source_stopped"] is None
    prediction = json.loads(job["prediction"])
    assert prediction["budget"] == 0.001 and prediction["seconds"] > 0.001
    assert set(prediction["parts"]) == {"stop", "final_pass", "verify", "start", "health"}
    assert prediction["entries"] > 0 and prediction["round"] == 1
    # What changes comes to little here: copying again would not have helped.
    assert not any("copying and hashing again" in m for m in event_messages(world, "east", "shop", 1))


@pytest.mark.parametrize(
    ("misbehaviour", "summary", "detail"),
    [
        # The source refuses to stop: its data component ignores SIGTERM.
        (
            {"ignore_stop": "yes"},
            "Stopping source failed: the app did not do what it was asked: see its component logs on east",
            "the source app did not stop: grid 'east': app 'shop' did not stop within 5s of SIGTERM: data",
        ),
        # The target fails to start: its data component will not run on grid west.
        (
            {"fail_on_grid": "west"},
            "Starting failed: the app did not do what it was asked: see its component logs on west",
            "the target app failed to start",
        ),
    ],
    ids=["source-refusing-to-stop", "target-failing-to-start"],
)
def test_app_misbehaving(world, misbehaviour, summary, detail):
    world.provision(properties=misbehaviour)
    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate", "--wait"
    )
    assert result.returncode != 0
    assert summary in result.stderr
    assert_failed_cleanly(world, 1, summary, detail)


def test_stalled_copy_fails_instead_of_hanging(world):
    world.provision(padding=4 << 20)
    env_file = world.app_dir("east", "shop") / "volumes/config/mig.env"
    env_file.write_text(env_file.read_text() + "MIG_STALL_TIMEOUT='2'\n")
    launched = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate", "--bwlimit", "400"
    )
    assert launched.returncode == 0, launched.stderr
    assert wait_for(lambda: any(line["kind"] == "progress" for line in world.helper_log("west", HELPER)), 30)
    # Freeze the rsync that reads the source: the copy stops moving, for real.
    senders = subprocess.run(["pgrep", "-f", "rsync --server --sender"], capture_output=True, text=True)
    pids = [int(p) for p in senders.stdout.split()]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        job = assert_failed_cleanly(world, 1, "Pre-copy failed: the copy moved no data for too long")
        assert "no progress for 2s" in job["error_detail"] or "timeout" in job["error_detail"], job
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_concurrent_calls_make_one_job(world):
    world.provision()
    calls = [
        world.popen_manage("east", "shop", "migrate_app", "--yes", "west", name, "--action", "snapshot")
        for name in ("first", "second")
    ]
    results = [(c.wait(120), *c.communicate()) for c in calls]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, _, err in results if code != 0)
    assert "refused: a snapshot of east/shop" in loser or "another job holds the lock: job #1" in loser, loser
    job = world.wait_job("east", "shop", 1)
    assert job["state"] == "done", job["error"]
    assert len(world.db("east", "shop", "SELECT id FROM migrations_app_migrationjob")) == 1


def test_without_yes_and_a_terminal_nothing_starts(world):
    world.provision()
    result = world.manage("east", "shop", "migrate_app", "west", "shop", "--action", "migrate")
    assert result.returncode != 0
    assert "destroys: the source app east/shop" in result.stdout
    assert "not started: add --yes to start without asking (the plan is above)" in result.stderr
    assert world.drivers["west"].list_apps() == []
    assert world.db("east", "shop", "SELECT id FROM migrations_app_migrationjob") == []


def test_dry_run_changes_nothing(world):
    world.provision()
    result = world.manage("east", "shop", "migrate_app", "west", "shop", "--action", "migrate", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "migrate east/shop → west/shop" in result.stdout
    assert "volume data" in result.stdout and "expected: about" in result.stdout
    assert "destroys: the source app east/shop with its volumes" in result.stdout
    assert "dry run: no lock taken, nothing changed" in result.stdout
    assert world.drivers["west"].list_apps() == []
    assert world.db("east", "shop", "SELECT id FROM migrations_app_migrationjob") == []


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["west", "shop", "--action", "migrate"],
            {"MIG_MODE": "snapshot"},
            "MIG_MODE=snapshot does not allow migrate",
        ),
        (["north", "shop", "--action", "migrate"], {}, "no grid 'north' in grid.info"),
        (["west", "a b", "--action", "migrate"], {}, "invalid app name 'a b'"),
        (["east", "shop", "--action", "snapshot"], {}, "that is this app itself"),
        (
            ["west", "shop", "--bwlimit", "0", "--action", "migrate"],
            {},
            "--bwlimit must be a positive number",
        ),
        (["west", "shop"], {}, "choose --action migrate or --action snapshot"),
        (
            ["west", "shop", "--action", "migrate", "--max-downtime", "0"],
            {},
            "--max-downtime: a downtime budget is more than 0 and at most 86400 seconds",
        ),
        (
            ["west", "shop", "--action", "migrate", "--over-budget", "proceed"],
            {},
            "--over-budget says what to do over a budget: give it with --max-downtime",
        ),
    ],
)
def test_refusals(world, args, env, message):
    world.provision(wait=False)
    world_env = world.mig_env("east", "shop")
    world_env.update(env)
    result = subprocess.run(
        [PYTHON, "manage.py", "migrate_app", "--yes", *args],
        cwd=world.app_dir("east", "shop") / "volumes/code",
        env=world_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert world.drivers["west"].list_apps() == []


def test_target_app_already_exists(world):
    world.provision()
    world.drivers["west"].define("shop", {"volumes": [], "components": []})
    result = world.manage("east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate")
    assert result.returncode != 0
    assert "an app named shop already exists on west" in result.stderr
    assert world.state("west", "shop") == "stopped"  # untouched


def test_everything_an_entry_has_arrives(world):
    # Through the whole path: rsync while the app runs, the final pass, verify.
    from .test_sync import described, make_special_entries

    def fill(data):
        (data / "dir").mkdir(parents=True)
        make_special_entries(data)

    world.provision(fill=fill)
    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "copy", "--action", "snapshot", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert world.wait_job("east", "shop", 1)["state"] == "done"
    source = world.app_dir("east", "shop") / "volumes/data"
    copy = world.app_dir("west", "copy") / "volumes/data"
    made = ["sparse.bin", "tagged.txt", "dir", "acl.txt", "one.txt", "dir/two.txt", "fifo", "socket"]
    made += ["empty", "setuid", "to-one"] + (["null"] if os.geteuid() == 0 else [])
    for rel in made:
        theirs, ours = described(source, rel), described(copy, rel)
        for entry in (theirs, ours):
            entry.inode = None  # inode numbers differ; that they are shared is checked below
            entry.allocated = None  # allocation: the sparse check is below
        assert ours == theirs, rel
    assert os.path.samefile(copy / "one.txt", copy / "dir/two.txt")
    assert os.stat(copy / "sparse.bin").st_blocks * 512 <= 1 << 20


def test_two_apps_on_one_grid_move_independently(tmp_path, ssh_hosts, client_key):
    """A grid that gives each app its own port runs two apps with MIG inside side by side;
    both migrate at once to another such grid, each with its own lock, helper and URL."""
    from .world import World

    world = World(tmp_path, ssh_hosts, client_key, per_app_ports=True)
    try:
        apps = ("shop", "blog")
        for app in apps:
            world.provision(app=app)
        before = {app: world.url("east", app) for app in apps}
        assert len(set(before.values())) == 2 and all(world.answering("east", app) for app in apps)
        runs = [
            world.popen_manage(
                "east", app, "migrate_app", "--yes", "west", app, "--action", "migrate", "--wait"
            )
            for app in apps
        ]
        for run in runs:
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, out + err
        for app in apps:
            assert world.wait_answering("west", app=app), app
            job = world.wait_job("west", app, 1)
            assert job["state"] == "done", job
            assert job["target_url"] == world.url("west", app)
            assert world.state("east", app) is None
        after = {app: world.url("west", app) for app in apps}
        assert len(set(after.values())) == 2, after
    finally:
        world.close()
