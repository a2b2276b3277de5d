"""The startup decision table: each row, its idempotency, and unreachable grids."""

import sqlite3
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import override_settings

from migrations_app import migration
from migrations_app.models import Lock

from .sshd import free_port

JOB = {
    "action": "snapshot",
    "source_grid": "east",
    "source_app": "shop",
    "target_grid": "west",
    "target_app": "copy",
    "helper_app": "MigHelper_copy",
    "started_by": "alice",
}


@pytest.fixture
def grid_info(tmp_path, settings, ssh_hosts, client_key):
    """east and west on ssh ports where nothing listens: any remote step would fail."""
    host = ssh_hosts[0]
    tables = []
    for name in ("east", "west"):
        table = host.grid_table(tmp_path / name).replace(
            f"port = {host.port}", f"port = {free_port(host.address)}"
        )
        tables.append(f"[grids.{name}]\n{table}connect_timeout = 2\n")
    path = tmp_path / "grid.info"
    path.write_text("\n".join(tables))
    settings.MIG_GRID_INFO_FILE = path
    settings.MIG_PRIVATE_KEY_FILE = client_key
    return path


@pytest.mark.django_db
def test_manually_started_snapshot_copy_touches_no_grid(grid_info):
    job = Lock.acquire(**JOB).job
    # Both grids are unreachable: the row must not need them.
    assert migration.complete(job, here=("west", "copy")) == migration.Outcome.CLEARED
    job.refresh_from_db()
    assert job.state == "done" and not Lock.objects.exists()
    assert "started by hand" in job.events.last().message


@pytest.mark.django_db
def test_neither_source_nor_target_leaves_the_lock(grid_info):
    job = Lock.acquire(**JOB).job
    assert migration.complete(job, here=("east", "other")) == migration.Outcome.HELD
    job.refresh_from_db()
    assert job.is_active and Lock.objects.exists()
    assert job.held and "neither the source nor the target" in job.attention
    assert job.events.last().message == job.attention


@pytest.mark.django_db
@pytest.mark.parametrize("here", [("east", "shop"), ("west", "shop")])
def test_unreachable_grid_leaves_the_lock_and_says_so(grid_info, here):
    job = Lock.acquire(**dict(JOB, action="migrate", target_app="shop", helper_app="MigHelper_shop")).job
    assert migration.complete(job, wait=0, here=here) == migration.Outcome.RETRY
    job.refresh_from_db()
    assert job.is_active and not job.held and Lock.objects.exists()
    event = job.events.last()
    assert event.level == "warning"
    assert "Could not finish the job now" in event.message and "MIG tries again" in event.message


@pytest.mark.django_db
def test_startup_without_identity_leaves_the_lock(grid_info):
    Lock.acquire(**JOB)
    err = StringIO()
    with override_settings(MIG_GRID="", MIG_APP=""):
        call_command("startup", stdout=StringIO(), stderr=err)
    assert "MIG_GRID/MIG_APP are not set: leaving it" in err.getvalue()
    assert Lock.objects.exists()


@pytest.mark.django_db
def test_a_job_started_since_mig_came_up_is_left_to_the_process_that_started_it(grid_info, settings):
    # `serve` answers while startup still runs in the background: a job started meanwhile
    # (its helper not provisioned yet) must not be taken for one left behind.
    settings.MIG_GRID, settings.MIG_APP = "east", "shop"
    job = Lock.acquire(**dict(JOB, action="migrate", target_app="shop", helper_app="MigHelper_shop")).job
    created = job.created.timestamp()
    out = StringIO()
    call_command("startup", "--mig-since", str(created - 5), stdout=out, stderr=StringIO())
    assert f"job #{job.pk} was started since MIG came up; its own process runs it" in out.getvalue()
    job.refresh_from_db()
    assert job.state == "pending" and list(job.events.values_list("message", flat=True)) == [
        "Lock taken by alice."
    ]
    # One from before MIG came up was left behind: the table's row takes it (the grids are
    # unreachable here, so it is tried again later).
    call_command("startup", "--mig-since", str(created + 5), stdout=StringIO(), stderr=StringIO())
    job.refresh_from_db()
    assert job.is_active and "Could not finish the job now" in job.events.last().message


def put_lock_back(world, grid, app, job_id):
    """The state a crash right after the remote steps of a row would leave behind."""
    path = world.app_dir(grid, app) / "volumes/config/mig.sqlite3"
    with sqlite3.connect(path, timeout=10) as db:
        db.execute(
            "INSERT INTO migrations_app_lock (slot, job_id, created) VALUES (1, ?, datetime('now'))",
            (job_id,),
        )
        db.execute(
            "UPDATE migrations_app_migrationjob SET state = 'finishing', finished = NULL WHERE id = ?",
            (job_id,),
        )


def test_target_row_is_idempotent_and_retries_an_unreachable_grid(world):
    world.provision()
    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert world.wait_job("west", "shop", 1)["state"] == "done"

    # A crash half-way through the row: helper and source are already gone, the lock is not.
    put_lock_back(world, "west", "shop", 1)
    grid_info = world.app_dir("west", "shop") / "volumes/config/grid.info"
    good = grid_info.read_text()
    east_port = world.configs["east"].port
    grid_info.write_text(good.replace(f"port = {east_port}", f"port = {free_port('127.0.0.2')}", 1))
    unreachable = world.manage("west", "shop", "startup")
    assert unreachable.returncode == 0, unreachable.stderr
    assert "Could not finish the job now" in unreachable.stderr
    assert len(world.locks("west", "shop")) == 1
    assert world.job("west", "shop", 1)["state"] == "finishing"

    grid_info.write_text(good)
    retried = world.manage("west", "shop", "startup")
    assert "job #1: done" in retried.stdout, retried.stdout + retried.stderr
    assert world.locks("west", "shop") == []
    assert world.job("west", "shop", 1)["state"] == "done"
    assert "nothing to do" in world.manage("west", "shop", "startup").stdout


def test_source_row_after_snapshot_is_idempotent(world):
    world.provision()
    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "copy", "--action", "snapshot", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert world.wait_job("east", "shop", 1)["state"] == "done"
    helper_events = [e for e in world.events("east", "shop", 1) if e["seq"] is not None]
    put_lock_back(world, "east", "shop", 1)
    again = world.manage("east", "shop", "startup")
    assert "job #1: done" in again.stdout, again.stdout + again.stderr
    assert world.job("east", "shop", 1)["state"] == "done"
    assert world.state("west", "copy") == "stopped"  # the snapshot is never touched
    # The helper's events were filed once, not twice.
    assert [e for e in world.events("east", "shop", 1) if e["seq"] is not None] == helper_events
