"""`manage.py snapshots` end to end: the copies this app made, started, refreshed (only the
changes move) and deleted, over real sshd grids, from inside the app."""

import os

from .world import wait_for

HELPER = "MigHelper_copy"


def snapshot(world, name="copy"):
    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", name, "--action", "snapshot", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert world.wait_answering("east")
    # The source's MIG, back up, ends the job (and records the snapshot).
    job_id = world.job("east", "shop")["id"]
    assert world.wait_job("east", "shop", job_id)["state"] == "done"


def listing(world):
    result = world.manage("east", "shop", "snapshots")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_start_refresh_and_delete_a_snapshot(world):
    # Data that does not change, so that "little else moves" has room: the final pass sends
    # whole 64 KiB blocks of MIG's database, which MIG writes while the job runs (a stress
    # run saw 430 KB of them, on a busy machine, beside a 1.3 MB app).
    world.provision(padding=4 << 20)
    assert "this app has made no snapshots" in listing(world)
    snapshot(world)
    lines = listing(world).splitlines()
    assert lines[0].split() == ["COPY", "TAKEN", "(UTC)", "SIZE", "STATE", "NOTE"]
    assert lines[1].startswith("west/copy ") and " stopped" in lines[1]

    # Starting it makes it an app of its own; nothing happens without a yes.
    refused = world.manage("east", "shop", "snapshots", "--start", "west/copy")
    assert refused.returncode != 0 and "not done: add --yes to start west/copy" in refused.stderr
    started = world.manage("east", "shop", "snapshots", "--start", "west/copy", "--yes")
    assert started.returncode == 0, started.stderr
    assert f"Started west/copy as an app of its own; its MIG answers at {world.url('west')}" in started.stdout
    assert world.wait_answering("west")
    # Its own MIG found the lock that was copied with it, and let it go.
    assert wait_for(lambda: world.locks("west", "copy") == [], 30)
    assert "started by" in listing(world)
    running = world.manage("east", "shop", "snapshots", "--delete", "west/copy", "--yes")
    assert running.returncode != 0 and "west/copy is running: it can be deleted only while it is stopped" in (
        running.stderr
    )

    # Refreshed once stopped: what changed here arrives there, and little else moves.
    world.drivers["west"].stop("copy")
    data = world.app_dir("east", "shop") / "volumes/data"
    (data / "new.bin").write_bytes(os.urandom(300_000))
    refreshed = world.manage("east", "shop", "snapshots", "--refresh", "west/copy", "--yes", "--wait")
    assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
    assert "destroys: what west/copy holds that this app no longer has" in refreshed.stdout
    assert world.wait_answering("east")
    job = world.wait_job("east", "shop", 2)
    assert job["state"] == "done" and job["refresh_of_id"] == 1, job
    assert 300_000 <= job["bytes_moved"] < job["bytes_total"] / 2, job
    copy = world.app_dir("west", "copy") / "volumes/data"
    assert (copy / "new.bin").read_bytes() == (data / "new.bin").read_bytes()
    assert world.state("west", "copy") == "stopped" and world.state("west", HELPER) is None
    rows = world.db("east", "shop", "SELECT state, job_id FROM migrations_app_snapshot")
    assert rows == [{"state": "complete", "job_id": 2}]

    deleted = world.manage("east", "shop", "snapshots", "--delete", "west/copy", "--yes")
    assert deleted.returncode == 0 and "Deleted west/copy and its data." in deleted.stdout, deleted.stderr
    assert world.state("west", "copy") is None
    assert "this app has made no snapshots" in listing(world)
    gone = world.manage("east", "shop", "snapshots", "--delete", "west/copy", "--yes")
    assert (
        gone.returncode != 0 and "this app made no snapshot 'west/copy' (its snapshots: none)" in gone.stderr
    )


def test_a_refresh_that_fails_while_it_writes_leaves_the_copy_incomplete(world):
    world.provision()
    snapshot(world)
    (world.app_dir("east", "shop") / "volumes/data/new.bin").write_bytes(os.urandom(2 << 20))
    launched = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "copy", "--refresh", "--bwlimit", "100"
    )
    assert launched.returncode == 0, launched.stderr
    assert wait_for(lambda: any(line["kind"] == "progress" for line in world.helper_log("west", HELPER)), 60)
    world.kill_helper_app("west", HELPER)
    job = world.wait_job("east", "shop", 2)
    assert job["state"] == "failed", job
    assert world.state("west", "copy") == "stopped"  # kept: a refresh never removes the copy
    assert "incomplete: a refresh failed while it wrote" in listing(world)
    refused = world.manage("east", "shop", "snapshots", "--start", "west/copy", "--yes")
    assert refused.returncode != 0 and "west/copy is incomplete" in refused.stderr
    # Refreshed again, it is whole.
    snapshot_again = world.manage("east", "shop", "snapshots", "--refresh", "west/copy", "--yes", "--wait")
    assert snapshot_again.returncode == 0, snapshot_again.stdout + snapshot_again.stderr
    assert world.wait_answering("east")
    assert world.wait_job("east", "shop", 3)["state"] == "done"
    rows = world.db("east", "shop", "SELECT state FROM migrations_app_snapshot")
    assert rows == [{"state": "complete"}]


def test_only_the_copy_this_app_made_is_refreshed_or_deleted(world):
    world.provision()
    snapshot(world)
    # Someone else's app now has the copy's name.
    world.drivers["west"].destroy("copy")
    world.drivers["west"].define("copy", {"volumes": ["data"], "components": []}, owner="someone-else")
    refresh = world.manage("east", "shop", "snapshots", "--refresh", "west/copy", "--yes")
    assert refresh.returncode != 0
    assert "west/copy is not the snapshot copy this app made: it is left alone" in refresh.stderr
    delete = world.manage("east", "shop", "snapshots", "--delete", "west/copy", "--yes")
    assert delete.returncode != 0 and "west/copy is another app now: MIG leaves it alone" in delete.stderr
    assert world.state("west", "copy") == "stopped"
    assert "another app now" in listing(world)
