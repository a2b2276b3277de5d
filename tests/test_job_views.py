"""The monitor page, its JSON status, and the job history with filters."""

import json as json_module

import pytest
from django.urls import reverse

from migrations_app.helper import protocol
from migrations_app.models import Grid, MigrationJob

pytestmark = pytest.mark.django_db


def make_job(**fields):
    values = {
        "action": "migrate",
        "source_grid": "east",
        "source_app": "shop",
        "target_grid": "west",
        "target_app": "shop",
        "helper_app": "MigHelper_shop",
    }
    values.update(fields)
    return MigrationJob.objects.create(**values)


def test_status_json_shape(logged_in):
    job = make_job(state="precopy", bytes_total=400, bytes_moved=100, journal_seq=7)
    job.progress = {"done": 100, "total": 400, "rate": 50.0, "eta": 6.0, "message": "pre-copy pass 1"}
    job.save()
    job.event("Pre-copy pass 1", phase="precopy")
    data = logged_in.get(reverse("job_status", args=[job.pk])).json()
    assert data["state"] == "precopy" and data["state_label"] == "Pre-copy" and data["active"] is True
    assert (data["seq"], data["bytes_total"], data["bytes_moved"]) == (7, 400, 100)
    assert data["progress"] == {
        "done": 100,
        "total": 400,
        "rate": 50.0,
        "eta": 6.0,
        "message": "pre-copy pass 1",
    }
    assert data["source"] == {"grid": "east", "app": "shop"}
    assert set(data["apps"]) == {"source", "helper", "target"}
    assert data["events"][-1]["message"] == "Pre-copy pass 1"
    assert {"time", "level", "phase", "message"} == set(data["events"][-1])
    assert "status_token" not in data and data["failure"] is None


def test_an_active_status_has_the_newest_events_oldest_first(logged_in):
    job = make_job(state="precopy")
    for i in range(MigrationJob.EVENTS_SHOWN + 5):
        job.event(f"step {i}", data={"big": "x" * 1000})
    data = logged_in.get(reverse("job_status", args=[job.pk])).json()
    shown = [e["message"] for e in data["events"]]
    assert shown == [f"step {i}" for i in range(5, MigrationJob.EVENTS_SHOWN + 5)]
    assert "big" not in json_module.dumps(data)


def test_an_ended_status_has_the_whole_log_and_the_failure(logged_in):
    job = make_job(state="precopy")
    for i in range(40):
        job.event(f"step {i}")
    failure = protocol.Failure(
        "Pre-copy failed: disk full on west: free space there.",
        protocol.Cause.DISK_FULL,
        "precopy",
        "rsync failed (status 11): No space left on device (28)",
    )
    job.end(MigrationJob.State.FAILED, failure)
    data = logged_in.get(reverse("job_status", args=[job.pk])).json()
    assert data["active"] is False and len(data["events"]) == 40
    assert data["failure"] == failure.to_dict() and data["progress"] is None


def test_the_predicted_downtime_travels_from_the_journal_to_the_status_and_the_page(logged_in):
    job = make_job(state="precopy", max_downtime=2.5, over_budget="proceed")
    prediction = protocol.Prediction(
        3.1, 2.5, {"stop": 0.3, "final_pass": 1.6, "verify": 0.5, "start": 0.5, "health": 0.2}, 0.4,
        20_000, 3, 1 << 20, 1,
    )  # fmt: skip
    line = {
        "seq": 5, "kind": protocol.EVENT, "time": "2026-12-03T10:00:00+00:00", "phase": "precopy",
        "message": "Predicted downtime 3.1s", "fact": protocol.PREDICTED, "prediction": prediction.to_dict(),
    }  # fmt: skip
    job.apply_helper_lines([line])
    data = logged_in.get(reverse("job_status", args=[job.pk])).json()
    assert protocol.Prediction.from_dict(data["prediction"]) == prediction
    page = logged_in.get(reverse("job", args=[job.pk])).content.decode()
    assert "<dt>Downtime budget</dt><dd>2.5 s; if predicted over it: go on</dd>" in page
    assert 'id="prediction"' in page


def test_status_requires_login(client, operator):
    job = make_job()
    assert client.get(reverse("job_status", args=[job.pk])).status_code == 302


def test_monitor_page_carries_what_the_browser_needs(logged_in):
    Grid.objects.create(
        name="west", driver="hostgrid", transport="local", root="/w", app_url="http://w:8080/"
    )
    job = make_job(state="precopy", status_url="http://w:4444/status", status_token="tok")
    page = logged_in.get(reverse("job", args=[job.pk])).content.decode()
    assert f"<title>Job #{job.pk}: Migrate shop → west/shop · MIG" in page
    for expected in (
        '"helper_url": "http://w:4444/status"',
        '"token": "tok"',
        '"target_url": "http://w:8080/"',
        '"order": ["pending", "provisioning", "precopy", "stopping", "final_sync", "verifying", "starting", '
        '"finishing", "rolling_back", "done", "failed", "cancelled", "overridden"]',
    ):
        assert expected in page
    assert 'data-phase="final_sync">Final pass</li>' in page


def test_finished_job_shows_result_and_no_token(logged_in):
    job = make_job(status_token="tok")
    job.event("all good")
    job.end(MigrationJob.State.DONE)
    page = logged_in.get(reverse("job", args=[job.pk])).content.decode()
    assert '"token": ""' in page and "all good" in page


def test_history_filters(logged_in):
    done = make_job()
    done.end(MigrationJob.State.DONE)
    snap = make_job(action="snapshot", target_grid="north", target_app="copy")
    other = make_job(source_grid="south", target_grid="west")

    def listed(query=""):
        page = logged_in.get(reverse("jobs") + query)
        return {job.pk for job in page.context["page"]}

    assert listed() == {done.pk, snap.pk, other.pk}
    assert listed("?state=done") == {done.pk}
    assert listed("?action=snapshot") == {snap.pk}
    assert listed("?grid=north") == {snap.pk}
    assert listed("?grid=south") == {other.pk}
    assert listed("?grid=east&action=migrate") == {done.pk}
    assert listed("?state=bogus") == set()
    assert "No jobs match these filters" in logged_in.get(reverse("jobs") + "?grid=nowhere").content.decode()


@pytest.fixture
def helper(grids):
    """A helper app on west with its work volume, as a job's helper would be."""
    grids["west"].define("MigHelper_shop", {"volumes": ["work"], "components": []})
    return grids["west"]


def cancel(client, job, confirm=True, json=True):
    headers = {"Accept": "application/json"} if json else {}
    return client.post(
        reverse("job_cancel", args=[job.pk]), {"confirm": "on"} if confirm else {}, headers=headers
    )


def test_a_cancel_reaches_the_helper_and_nothing_else(logged_in, helper):
    job = make_job(state="precopy")
    events = job.events.count()
    answer = cancel(logged_in, job)
    assert answer.status_code == 200 and answer.json()["ok"] is True
    assert "the helper rolls back at its next step" in answer.json()["message"]
    text, _ = helper.read_file("MigHelper_shop", "volumes/work/cancel.json")
    assert json_module.loads(text) == {"by": "operator"}
    # MIG's database is the final pass's to copy: the request wrote nothing there.
    job.refresh_from_db()
    assert job.events.count() == events and job.cancel == {}


def test_a_cancel_before_the_helper_exists_waits_in_the_job(logged_in, grids):
    job = make_job(state="provisioning")
    assert cancel(logged_in, job).json()["ok"] is True
    job.refresh_from_db()
    assert job.cancel == {"by": "operator"}  # the runner passes it on once the helper is there
    assert "Cancel requested by operator" in job.events.last().message


@pytest.mark.parametrize(
    ("state", "said"),
    [
        ("starting", "cannot be cancelled: the cut-over is committed"),
        ("rolling_back", "is rolling back already"),
    ],
)
def test_a_cancel_too_late_says_why(logged_in, helper, state, said):
    job = make_job(state=state)
    answer = cancel(logged_in, job)
    assert answer.status_code == 409 and said in answer.json()["message"]
    assert helper.read_file("MigHelper_shop", "volumes/work/cancel.json")[0] == ""


def test_a_cancel_must_be_confirmed_and_an_ended_job_has_nothing_to_cancel(logged_in, helper):
    job = make_job(state="precopy")
    assert "Tick the box" in cancel(logged_in, job, confirm=False).json()["message"]
    job.end(MigrationJob.State.DONE)
    page = cancel(logged_in, job, json=False)
    assert page["Location"] == reverse("job", args=[job.pk])
    assert "has ended (done): nothing to cancel" in logged_in.get(page["Location"]).content.decode()
