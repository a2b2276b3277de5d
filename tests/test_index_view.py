"""The target form: choices, pre-flight errors next to their field, one job per submit."""

import threading

import pytest
from django.db import connection
from django.urls import reverse

from migrations_app.models import Grid, Lock, MigrationJob

from .conftest import needs_root

pytestmark = pytest.mark.django_db


def post(client, **fields):
    data = {"target_grid": "west", "target_app": "shop", "action": "migrate", "bwlimit": ""}
    data.update(fields)
    return client.post(reverse("index"), data)


def field_errors(response, field):
    return [str(e) for e in response.context["form"].errors.get(field, [])]


def test_requires_login(client, operator):
    response = client.get(reverse("index"))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_form_offers_grids_with_their_last_check_and_the_allowed_actions(logged_in, grids, settings):
    Grid.objects.record_check("west", False, "unreachable yesterday")
    settings.MIG_MODE = "snapshot"
    page = logged_in.get(reverse("index")).content.decode()
    assert "west — checked" in page and "FAILED: unreachable yesterday" in page
    assert "east — not checked yet" in page
    assert 'value="snapshot"' in page and 'value="migrate"' not in page
    assert '<label for="id_target_app">Target app name</label>' in page
    assert "<title>Migrate or snapshot this app · MIG in east/shop</title>" in page


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"target_app": "x; rm -rf /"}, "target_app", "invalid app name"),
        ({"target_app": "shop", "target_grid": "east"}, "target_app", "that is this app itself"),
        ({"target_grid": "gone"}, "target_grid", "gone cannot be reached"),
        ({"target_grid": "spoofed"}, "target_grid", "HOST KEY MISMATCH"),
        ({"target_grid": "nowhere"}, "target_grid", "Select a valid choice"),
        ({"action": "teleport"}, "action", "Select a valid choice"),
        ({"bwlimit": "-5"}, "bwlimit", "greater than or equal to 1"),
        ({"max_downtime": "0"}, "max_downtime", "a downtime budget is more than 0"),
        ({"max_downtime": "1e9"}, "max_downtime", "at most 86400 seconds"),
        ({"max_downtime": "nan"}, "max_downtime", "Enter a number"),
        ({"max_downtime": "5", "over_budget": "maybe"}, "over_budget", "Select a valid choice"),
    ],
)
def test_errors_are_shown_next_to_their_field(logged_in, grids, fields, field, message):
    response = post(logged_in, **fields)
    assert response.status_code == 200
    assert any(message in e for e in field_errors(response, field)), response.context["form"].errors
    page = response.content.decode()
    # The error is where the field says it is: its aria-describedby names the error's id.
    assert f'id="id_{field}_error"' in page
    if field != "action":
        assert f'aria-describedby="id_{field}_helptext id_{field}_error"' in page or (
            f'aria-describedby="id_{field}_error"' in page
        )
    assert not MigrationJob.objects.exists() and not Lock.objects.exists()


def test_a_huge_name_is_refused_without_echoing_it(logged_in, grids):
    response = post(logged_in, target_app="x" * 1_000_000)
    (error,) = field_errors(response, "target_app")
    assert "a target app's name has at most 54 characters (this one has 200)" in error
    assert len(response.content) < 100_000  # the form does not send the megabyte back either
    assert not MigrationJob.objects.exists()


def test_target_app_exists(logged_in, grids):
    grids["west"].define("shop", {"volumes": [], "components": []})
    response = post(logged_in)
    assert field_errors(response, "target_app") == ["an app named shop already exists on west"]
    assert not MigrationJob.objects.exists()


def test_failed_check_is_recorded_for_the_form(logged_in, grids):
    post(logged_in, target_grid="spoofed")
    grid = Grid.objects.get(name="spoofed")
    assert grid.check_ok is False and "HOST KEY MISMATCH" in grid.check_message


@needs_root
def test_not_enough_space(logged_in, grids, tmp_path, settings):
    import subprocess

    from migrations_app.grids import gridinfo, open_grid

    root = tmp_path / "west"
    # Put the target grid on a 1 MiB filesystem: the copy's margin alone does not fit.
    for app in grids["west"].list_apps():
        grids["west"].destroy(app.name)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        open_grid(gridinfo.load(settings.MIG_GRID_INFO_FILE)["west"], settings.MIG_PRIVATE_KEY_FILE).init()
        response = post(logged_in)
        errors = field_errors(response, "target_grid")
        assert len(errors) == 1 and errors[0].startswith("not enough space on west: the copy needs")
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_mode_limits_actions(logged_in, grids, settings):
    settings.MIG_MODE = "snapshot"
    response = post(logged_in, action="migrate")
    assert field_errors(response, "action")[0].startswith("Select a valid choice")


def test_a_name_too_long_for_its_helper_is_refused_not_cut(logged_in, grids):
    page = logged_in.get(reverse("index")).content.decode()
    assert "maxlength" not in page  # a browser would cut the name silently
    response = post(logged_in, target_app="a" * 55)
    assert field_errors(response, "target_app") == [
        "a target app's name has at most 54 characters (this one has 55): its helper is named "
        "MigHelper_<name>, and that must fit in 64"
    ]
    assert not MigrationJob.objects.exists()


def test_the_plan_is_shown_and_a_migration_must_be_confirmed(logged_in, grids):
    response = post(logged_in)
    page = response.content.decode()
    assert response.status_code == 200 and not MigrationJob.objects.exists()
    assert "<h1>Migrate east/shop → west/shop?</h1>" in page
    for said in ("Expected duration", "Expected downtime", "the source app east/shop with its volumes"):
        assert said in page
    assert "I understand: east/shop is destroyed once it runs on west/shop." in page
    data = {"target_grid": "west", "target_app": "shop", "action": "migrate", "bwlimit": ""}
    response = logged_in.post(reverse("start"), data)
    assert "Tick the box to confirm" in response.content.decode() and not MigrationJob.objects.exists()
    response = logged_in.post(reverse("start"), {**data, "confirm": "on"})
    job = MigrationJob.objects.get()
    assert response["Location"] == reverse("job", args=[job.pk]) and job.action == "migrate"


def test_the_plan_is_checked_again_when_confirmed(logged_in, grids):
    post(logged_in)
    grids["west"].define("shop", {"volumes": [], "components": []})  # meanwhile, someone took the name
    data = {"target_grid": "west", "target_app": "shop", "action": "migrate", "bwlimit": "", "confirm": "on"}
    response = logged_in.post(reverse("start"), data)
    assert field_errors(response, "target_app") == ["an app named shop already exists on west"]
    assert not MigrationJob.objects.exists()


def test_valid_submit_creates_the_job_and_answers_at_once(logged_in, grids):
    data = {"target_grid": "west", "target_app": "copy", "action": "snapshot", "bwlimit": "500"}
    data.update(max_downtime="2.5", over_budget="proceed")
    plan = post(logged_in, **data).content.decode()
    assert "Take the snapshot" in plan
    assert "2.5 s: if the helper predicts more before the stop, the job goes on, over the budget" in plan
    response = logged_in.post(reverse("start"), data)
    job = MigrationJob.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("job", args=[job.pk])
    assert (job.action, job.target_grid, job.target_app) == ("snapshot", "west", "copy")
    assert job.bwlimit_kbps == 500
    assert (job.max_downtime, job.over_budget) == (2.5, "proceed")
    assert job.started_by == "operator" and Lock.objects.get().job == job
    # With the lock held, the form gives way to the lock page.
    assert logged_in.get(reverse("index"))["Location"] == reverse("lock")


@pytest.mark.django_db(transaction=True)
def test_two_submits_at_once_make_one_job(client, operator, grids):
    client.force_login(operator)
    responses = []

    def submit():
        data = {"target_grid": "west", "target_app": "copy", "action": "snapshot", "bwlimit": ""}
        responses.append(client.post(reverse("start"), data))
        connection.close()

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job = MigrationJob.objects.get()
    assert sorted(r.status_code for r in responses) == [302, 302]
    assert {r["Location"] for r in responses} <= {reverse("job", args=[job.pk]), reverse("lock")}
