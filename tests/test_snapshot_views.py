"""The snapshots page: each copy with what its grid says of it now, and start and delete
behind a confirmation."""

import pytest
from django.urls import reverse
from django.utils import timezone

from migrations_app.models import MigrationJob, Snapshot

pytestmark = pytest.mark.django_db


def made(grid="west", app="copy", owner="mig-job:abc"):
    job = MigrationJob.objects.create(
        action="snapshot", source_grid="east", source_app="shop", target_grid=grid, target_app=app
    )
    return Snapshot.objects.create(
        grid=grid, app=app, owner=owner, job=job, taken=timezone.now(), bytes=2 << 20
    )


def test_the_list_says_what_each_grid_says(logged_in, grids):
    grids["west"].define("copy", {"volumes": ["data"], "components": []}, owner="mig-job:abc")
    grids["west"].define("taken", {"volumes": [], "components": []}, owner="someone-else")
    made()
    made(app="gone")
    made(app="taken")
    page = logged_in.get(reverse("snapshots")).content.decode()
    assert "west/copy" in page and "stopped" in page and "2.0 MiB" in page
    assert "west/gone is not on its grid any more" in page
    assert "west/taken is another app now: MIG leaves it alone" in page
    # Start and refresh only for a copy that is there and this app's; delete for a gone one too.
    assert page.count(">Start…<") == 1 and page.count(">Refresh…<") == 1 and page.count(">Delete…<") == 2


def test_delete_asks_first_and_says_what_it_removes(logged_in, grids):
    grids["west"].define("copy", {"volumes": ["data"], "components": []}, owner="mig-job:abc")
    snapshot = made()
    url = reverse("snapshot_delete", args=[snapshot.pk])
    page = logged_in.get(url).content.decode()
    assert "Delete west/copy and its data (2.0 MiB) from grid west. This cannot be undone." in page
    assert logged_in.post(url, {}).status_code == 200 and grids["west"].exists("copy")  # not confirmed
    answer = logged_in.post(url, {"confirm": "on"})
    assert answer["Location"] == reverse("snapshots")
    assert not grids["west"].exists("copy")
    snapshot.refresh_from_db()
    assert snapshot.state == Snapshot.State.DELETED and snapshot.deleted_by == "operator"
    assert "Deleted west/copy and its data." in logged_in.get(answer["Location"]).content.decode()


def test_a_snapshot_job_links_its_copy(logged_in):
    snapshot = made()
    snapshot.job.end(MigrationJob.State.DONE)
    status = logged_in.get(reverse("job_status", args=[snapshot.job.pk])).json()
    assert status["links"] == {"snapshot": f"{reverse('snapshots')}#snapshot-west-copy"}
