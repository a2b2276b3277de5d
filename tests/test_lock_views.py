"""The lock page and the override: shown, confirmed, recorded; nothing touched on a grid."""

import pytest
from django.urls import reverse

from migrations_app.models import Lock, MigrationJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def job():
    return Lock.acquire(
        action="migrate",
        source_grid="east",
        source_app="shop",
        target_grid="west",
        target_app="shop",
        helper_app="MigHelper_shop",
        started_by="alice",
    ).job


def test_lock_page_says_who_started_what_and_when(logged_in, job):
    assert logged_in.get(reverse("index"))["Location"] == reverse("lock")
    page = logged_in.get(reverse("lock")).content.decode()
    assert "Migrate east/shop → west/shop" in page
    assert "alice" in page and f'href="{reverse("job", args=[job.pk])}"' in page
    assert f'href="{reverse("override")}"' in page


def test_override_asks_for_confirmation(logged_in, job):
    page = logged_in.get(reverse("override")).content.decode()
    assert "nothing on any grid is changed or removed" in page
    response = logged_in.post(reverse("override"), {"reason": "helper host died"})
    assert response.status_code == 200
    assert response.context["form"].errors["confirm"] == ["This field is required."]
    assert Lock.objects.exists()


def test_override_is_recorded_and_releases_the_lock(logged_in, job, settings, tmp_path):
    # grid.info points nowhere: an override that tried to touch a grid would fail.
    settings.MIG_GRID_INFO_FILE = tmp_path / "missing.info"
    response = logged_in.post(reverse("override"), {"reason": "helper host died", "confirm": "on"})
    assert response["Location"] == reverse("index")
    job.refresh_from_db()
    assert job.state == MigrationJob.State.OVERRIDDEN
    assert job.error == "Overridden by operator: helper host died"
    event = job.events.last()
    assert event.level == "warning" and event.data == {"by": "operator"}
    assert not Lock.objects.exists()
    assert logged_in.get(reverse("index")).status_code == 200


def test_no_lock_pages_without_a_lock(logged_in):
    assert logged_in.get(reverse("lock"))["Location"] == reverse("index")
    assert logged_in.get(reverse("override"))["Location"] == reverse("index")


def test_a_held_job_says_what_the_operator_must_do(logged_in, job):
    page = logged_in.get(reverse("lock")).content.decode()
    assert "Held: an operator must act" not in page
    job.hold("Stop the copy on west, then override the lock.")
    page = logged_in.get(reverse("lock")).content.decode()
    assert "Held: an operator must act" in page and "Stop the copy on west, then override the lock." in page
    status = logged_in.get(reverse("job_status", args=[job.pk])).json()
    assert status["held"] is True and status["attention"] == "Stop the copy on west, then override the lock."
