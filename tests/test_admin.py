"""The Django admin shows grids, jobs with their events and lock, events and the lock."""

import pytest
from django.urls import reverse

from migrations_app.models import Grid, Lock

pytestmark = pytest.mark.django_db


@pytest.fixture
def job():
    lock = Lock.acquire(
        action="snapshot",
        source_grid="east",
        source_app="shop",
        target_grid="west",
        target_app="shop-copy",
        started_by="alice",
    )
    lock.job.event("pre-copy 40% done", phase="precopy", data={"bytes_done": 40})
    lock.job.status_token = "s3cret-status-token"
    lock.job.save()
    return lock.job


def test_admin_pages_load(admin_client, job):
    Grid.objects.create(name="east", driver="hostgrid", transport="local", root="/srv/east")
    urls = [
        reverse("admin:index"),
        reverse("admin:migrations_app_grid_changelist"),
        reverse("admin:migrations_app_grid_change", args=[Grid.objects.get().pk]),
        reverse("admin:migrations_app_migrationjob_changelist") + "?state__exact=pending",
        reverse("admin:migrations_app_jobevent_changelist") + "?q=pre-copy",
        reverse("admin:migrations_app_lock_changelist"),
        reverse("admin:migrations_app_lock_change", args=[job.lock.pk]),
    ]
    for url in urls:
        response = admin_client.get(url)
        assert response.status_code == 200, url


def test_job_page_shows_events_and_lock_read_only(admin_client, job):
    response = admin_client.get(reverse("admin:migrations_app_migrationjob_change", args=[job.pk]))
    assert response.status_code == 200
    page = response.content.decode()
    assert "pre-copy 40% done" in page
    assert "Lock taken by alice." in page
    assert "s3cret-status-token" not in page
    # Events are shown, never editable.
    assert 'name="events-0-message"' not in page


def test_lock_cannot_be_deleted_in_admin(admin_client, job):
    response = admin_client.post(
        reverse("admin:migrations_app_lock_delete", args=[job.lock.pk]), {"post": "yes"}
    )
    assert response.status_code == 403
    assert Lock.objects.exists()


def test_admin_requires_login(client):
    response = client.get(reverse("admin:migrations_app_migrationjob_changelist"))
    assert response.status_code == 302
