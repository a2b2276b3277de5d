"""The monitor page, its JSON status, and the job history with filters."""

import pytest
from django.urls import reverse

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
    job = make_job(state="precopy", bytes_total=400, bytes_done=100, rate=50.0, eta_seconds=6.0)
    job.event("Pre-copy pass 1", phase="precopy")
    data = logged_in.get(reverse("job_status", args=[job.pk])).json()
    assert data["state"] == "precopy" and data["state_label"] == "Pre-copy" and data["active"] is True
    assert (data["bytes_done"], data["bytes_total"], data["percent"]) == (100, 400, 25.0)
    assert (data["rate"], data["eta_seconds"]) == (50.0, 6.0)
    assert data["source"] == {"grid": "east", "app": "shop"}
    assert set(data["apps"]) == {"source", "helper", "target"}
    assert data["events"][-1]["message"] == "Pre-copy pass 1"
    assert {"time", "level", "phase", "message"} == set(data["events"][-1])
    assert "status_token" not in data


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
    ):
        assert expected in page
    assert 'data-phase="final_sync">Final sync</li>' in page


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
