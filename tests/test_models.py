"""The lock is enforced by the database; jobs keep their history and their invariants."""

import dataclasses

import pytest
from django.db import IntegrityError, transaction

from migrations_app.grids import gridinfo
from migrations_app.helper import protocol
from migrations_app.models import Grid, JobEvent, Lock, LockHeld, MigrationJob

pytestmark = pytest.mark.django_db

JOB = {
    "action": "migrate",
    "source_grid": "east",
    "source_app": "shop",
    "target_grid": "west",
    "target_app": "shop",
    "started_by": "alice",
}


def test_second_lock_is_refused_by_the_database():
    first = MigrationJob.objects.create(**JOB)
    second = MigrationJob.objects.create(**JOB)
    Lock.objects.create(job=first)
    with pytest.raises(IntegrityError), transaction.atomic():
        # A raw insert, bypassing every Python-side check.
        Lock.objects.bulk_create([Lock(job=second)])
    assert Lock.objects.count() == 1


def test_lock_slot_must_be_one():
    job = MigrationJob.objects.create(**JOB)
    with pytest.raises(IntegrityError), transaction.atomic():
        Lock.objects.create(job=job, slot=2)


def test_acquire_refuses_while_held_and_names_the_holder():
    lock = Lock.acquire(**JOB)
    with pytest.raises(LockHeld) as refused:
        Lock.acquire(**dict(JOB, target_app="other", started_by="bob"))
    message = str(refused.value)
    assert f"job #{lock.job.pk}" in message and "started by alice" in message
    # The refused attempt left no job behind.
    assert MigrationJob.objects.count() == 1
    lock.job.end(MigrationJob.State.DONE)
    assert Lock.acquire(**dict(JOB, started_by="bob")).job.started_by == "bob"


def test_acquire_records_an_event():
    lock = Lock.acquire(**JOB)
    assert list(lock.job.events.values_list("message", flat=True)) == ["Lock taken by alice."]


def test_job_cannot_target_itself():
    with pytest.raises(IntegrityError), transaction.atomic():
        MigrationJob.objects.create(**dict(JOB, target_grid="east"))


def test_snapshot_to_same_grid_under_another_name_is_allowed():
    job = MigrationJob.objects.create(**dict(JOB, action="snapshot", target_grid="east", target_app="copy"))
    assert job.pk


def test_a_job_ends_once_and_releases_its_lock_with_it():
    job = Lock.acquire(**JOB).job
    assert job in MigrationJob.objects.active()
    assert job.end(MigrationJob.State.FAILED, "helper lost")
    assert not Lock.objects.exists()
    assert not job.end(MigrationJob.State.DONE)
    job.refresh_from_db()
    assert job.state == "failed" and job.error_detail == "helper lost" and job.finished
    assert (
        job.error
        == "Provisioning failed: an unexpected error: see the details below, and the helper's log on west."
    )
    assert job not in MigrationJob.objects.active()


def test_a_job_never_reads_ended_while_its_lock_is_held(transactional_db):
    # end() is one transaction: a failure half-way leaves both as they were.
    job = Lock.acquire(**JOB).job
    with pytest.raises(IntegrityError), transaction.atomic():
        job.end(MigrationJob.State.DONE)
        raise IntegrityError("a failure after the job ended, before the transaction committed")
    job.refresh_from_db()
    assert job.is_active and Lock.objects.get().job == job


def test_a_held_job_says_what_to_do_once():
    job = Lock.acquire(**JOB).job
    job.hold("start the target with manage.py recover 1")
    job.hold("start the target with manage.py recover 1")
    assert job.held and job.to_dict()["attention"] == "start the target with manage.py recover 1"
    assert job.events.filter(level="warning").count() == 1
    job.end(MigrationJob.State.DONE)
    assert not job.held and job.attention == ""


def test_one_runner_at_a_time():
    job = MigrationJob.objects.create(**JOB)
    assert job.claim_runner("1 100", alive=lambda runner: True)
    assert not job.claim_runner("2 200", alive=lambda runner: True)
    assert job.claim_runner("1 100", alive=lambda runner: True)  # its own claim again
    # The first runner is gone: another may take over.
    assert job.claim_runner("2 200", alive=lambda runner: False)
    assert job.runner == "2 200"


def test_every_job_has_its_own_uid():
    first, second = MigrationJob.objects.create(**JOB), MigrationJob.objects.create(**JOB)
    assert len(first.uid) == 32 and first.uid != second.uid
    assert first.owner_tag == f"mig-job:{first.uid}"


def test_helper_event_is_filed_once():
    job = MigrationJob.objects.create(**JOB)
    job.event("pre-copy started", seq=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        job.event("pre-copy started", seq=1)
    job.event("MIG note")
    job.event("another MIG note")
    assert JobEvent.objects.filter(job=job).count() == 3


def test_to_dict_is_the_status_shape_the_helper_answers_too():
    job = MigrationJob.objects.create(**JOB, bytes_total=200)
    data = job.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(protocol.Status)}
    assert data["source"] == {"grid": "east", "app": "shop"} and data["answered_by"] == "mig"
    assert data["active"] is True and data["bytes_total"] == 200 and data["progress"] is None


def line(seq, kind="event", **fields):
    return {"seq": seq, "time": "2026-12-01T10:00:00+00:00", "kind": kind, **fields}


def test_helper_lines_move_the_job_forward_only():
    job = MigrationJob.objects.create(**JOB, state="precopy")
    progress = {"bytes_done": 50, "bytes_total": 200, "rate": 10.0, "eta": 15.0, "message": "pass 1"}
    job.apply_helper_lines(
        [line(1, phase="precopy"), line(2, "progress", phase="precopy", bytes_moved=50, **progress)]
    )
    assert job.state == "precopy" and job.journal_seq == 2 and job.bytes_moved == 50
    assert job.to_dict()["progress"] == {
        **{"done": 50, "total": 200, "rate": 10.0, "eta": 15.0},
        "message": "pass 1",
        "phase": "precopy",
    }
    job.apply_helper_lines([line(3, phase="verifying"), line(4, phase="stopping")])
    assert job.state == "verifying" and job.progress is None  # a new phase: no figures yet
    failure = {
        "summary": "Verifying failed: the copy did not match.",
        "cause": "verify mismatch",
        "phase": "verifying",
        "detail": "verify failed, 1 difference(s): a size 1 ≠ 2",
    }
    job.apply_helper_lines(
        [
            line(
                5,
                phase="rolling_back",
                fact="failing",
                failure=failure,
                level="error",
                message=failure["summary"],
            )
        ]
    )
    assert job.state == "rolling_back" and job.error == failure["summary"]
    assert job.to_dict()["failure"] == failure
    job.apply_helper_lines([line(6, phase="precopy", message="late")])  # a line read late
    assert job.state == "rolling_back" and job.journal_seq == 6


GRID_INFO = """
[grids.east]
driver = "hostgrid"
transport = "local"
root = "/srv/east"

[grids.west]
driver = "hostgrid"
transport = "local"
root = "/srv/west"
"""


def test_grid_sync_mirrors_and_keeps_unlisted_grids():
    configs = gridinfo.parse(GRID_INFO)
    assert Grid.objects.sync_from(configs) == (["east", "west"], [], [])
    assert Grid.objects.sync_from(configs) == ([], [], [])
    west_moved = '[grids.west]\ndriver = "hostgrid"\ntransport = "local"\nroot = "/srv/west2"\n'
    changed = gridinfo.parse(west_moved)
    assert Grid.objects.sync_from(changed) == ([], ["west"], ["east"])
    east = Grid.objects.get(name="east")
    assert not east.in_grid_info
    assert list(Grid.objects.listed().values_list("name", flat=True)) == ["west"]


def test_an_ended_job_keeps_no_status_token():
    job = MigrationJob.objects.create(**JOB, status_token="secret-token")
    job.end(MigrationJob.State.DONE)
    assert job.status_token == "" and MigrationJob.objects.get(pk=job.pk).status_token == ""


def test_a_migration_that_arrived_here_has_started_here():
    job = MigrationJob.objects.create(**JOB, state="precopy")  # as copied at hands off
    other = MigrationJob.objects.create(**{**JOB, "target_app": "blog"}, state="precopy")
    assert MigrationJob.objects.arrived("west", "shop") == 1
    job.refresh_from_db()
    other.refresh_from_db()
    assert job.state == "starting" and other.state == "precopy"
    job.apply_helper_lines([line(9, phase="finishing")])
    assert job.state == "finishing" and MigrationJob.objects.arrived("west", "shop") == 0
