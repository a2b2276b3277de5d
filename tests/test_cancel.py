"""`manage.py cancel` end to end: before the commit the job rolls back as a failure does;
after it, the helper refuses and says why, and the job goes on."""

from .world import wait_for

HELPER = "MigHelper_shop"


def test_cancel_during_the_precopy_rolls_back(world):
    world.provision(padding=4 << 20)
    launched = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate", "--bwlimit", "200"
    )
    assert launched.returncode == 0, launched.stderr
    assert wait_for(lambda: any(line["kind"] == "progress" for line in world.helper_log("west", HELPER)), 60)
    result = world.manage("east", "shop", "cancel", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Cancel requested for job #1" in result.stdout
    assert "job 1: Rolled back: cancelled: Cancelled by " in result.stdout, result.stdout
    job = world.wait_job("east", "shop", 1, states=("cancelled",))
    assert job["failure_cause"] == "cancelled" and job["failed_phase"] == "precopy"
    assert world.running("east", "shop") and world.state("west", "shop") is None
    assert world.state("west", HELPER) is None and world.locks("east", "shop") == []
    # Once over, there is nothing to cancel; the next job runs as if nothing happened.
    again = world.manage("east", "shop", "cancel", "1")
    assert again.returncode != 0 and "job #1 has ended (cancelled): nothing to cancel" in again.stderr


def test_a_cancel_after_the_commit_is_refused_and_the_move_goes_on(world):
    world.provision()
    launched = world.manage("east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate")
    assert launched.returncode == 0, launched.stderr

    def starting():
        return any(line.get("fact") == "app_starting" for line in world.helper_log("west", HELPER))

    # Committed, and starting the target: it takes a while for MIG to listen there.
    assert wait_for(starting, 90, interval=0.02)
    # What MIG's cancel writes (MIG itself is down now, its app stopped for the cut-over).
    world.drivers["west"].put_file(HELPER, "volumes/work/cancel.json", b'{"by": "alice"}', 0o644)
    job = world.wait_job("west", "shop", 1)
    assert job["state"] == "done", job
    refused = [e for e in world.filed_journal("west", "shop", 1) if e.get("fact") == "cancel_refused"]
    assert len(refused) == 1 and refused[0]["message"].startswith("Cancel requested by alice, refused: ")
    assert world.state("east", "shop") is None
