"""In a real browser: log in to the demo, migrate it, watch the monitor, land on the target.

Drives Debian's Chromium (/usr/bin/chromium) through Playwright; Playwright's own browser
download is not available on these machines. Screenshots go to test-artifacts/.
"""

import os
import random
import signal
import socket
import time
from pathlib import Path

import pytest

from migrations_app.helper.progress import human_bytes
from migrations_app.models import MigrationJob

from .conftest import ROOT, ctrl_c, popen_demo
from .world import processes

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.browser

# The order a job goes through its states: what the page shows must never go back in it.
ORDER = [*MigrationJob.ACTIVE_STATES, *MigrationJob.ENDED_STATES]


def free_port_pair():
    """Two free ports in a row for the demo, outside the range the kernel hands out (for
    a bind to port 0, and to each connection): a port from it, another test's, once took
    the second one between this check and the target's bind."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = [*range(10_000, low - 1), *range(high + 1, 65_534)]
    for _ in range(100):
        port = random.choice(candidates)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two free ports in a row")


@pytest.fixture
def demo(tmp_path):
    """`manage.py demo`, as the README runs it; yields (url, password, port)."""
    port = free_port_pair()
    proc = popen_demo(tmp_path, port)
    lines, password = [], None
    deadline = time.monotonic() + 90
    while password is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip().startswith("password:"):
            password = line.split(":", 1)[1].strip()
    assert password, "the demo did not start:\n" + "".join(lines)
    yield f"http://127.0.0.1:{port}/", password, port
    out = ctrl_c(proc, timeout=60)
    assert "stopped; run `./dev demo` again to resume" in out, out


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    args = [
        "--headless=new",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield browser
        browser.close()


def state(page):
    try:
        return page.eval_on_selector("#state", "e => e.dataset.state")
    except Exception:  # navigating between MIGs
        return None


def test_migrate_the_demo_in_the_browser(demo, browser):
    url, password, port = demo
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(url)
    assert page.title().startswith("Log in · MIG")
    page.get_by_label("User name").fill("demo")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(url)

    page.get_by_label("Target grid", exact=True).select_option("west")
    page.get_by_label("Target app name").fill("shop")
    page.get_by_label("Migrate — move this app to the target grid", exact=False).check()
    # Slow enough to watch: about five seconds of pre-copy.
    page.get_by_label("Bandwidth limit (KiB/s)").fill("100")
    page.get_by_role("button", name="Review the plan").click()
    page.get_by_label("I understand: east/shop is destroyed once it runs on west/shop.").check()
    # A double click sends the form twice: there must still be one job.
    page.get_by_role("button", name="Migrate now").dblclick()
    page.wait_for_url(f"{url}jobs/1/", timeout=30_000)

    seen, shot = [], False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = state(page)
        if current and (not seen or seen[-1] != current):
            seen.append(current)
        if current == "precopy" and not shot and page.eval_on_selector("#progress", "e => e.value > 0"):
            page.screenshot(path=str(ARTIFACTS / "monitor-mid-migration.png"), full_page=True)
            shot = True
        if current == "done":
            break
        time.sleep(0.1)

    target = f"http://127.0.0.1:{port + 1}/"
    assert page.url.startswith(f"{target}jobs/1/?after="), (page.url, seen)
    assert [ORDER.index(s) for s in seen] == sorted(ORDER.index(s) for s in seen), f"went back: {seen}"
    assert seen[-1] == "done", seen
    assert "precopy" in seen and seen.index("precopy") < seen.index("done")
    assert {"stopping", "final_sync", "verifying", "starting", "finishing"} & set(seen), seen
    assert shot, f"never saw progress during pre-copy: {seen}"
    assert page.locator("#result-state").inner_text() == "Done"
    assert page.locator("#app-target").inner_text() == "running"
    assert page.locator("#app-source").inner_text() == "destroyed"
    assert page.title().startswith("Job #1: Migrate shop → west/shop · MIG in west/shop")
    page.screenshot(path=str(ARTIFACTS / "monitor-done-on-target.png"), full_page=True)

    # One job, though the form was sent twice; the history shows it on the target.
    page.goto(f"{target}jobs/")
    assert page.locator("tbody tr").count() == 1
    assert errors == []
    assert Path(ARTIFACTS / "monitor-mid-migration.png").stat().st_size > 10_000


# --- every kind of job, watched in the browser ---------------------------------------------


class Watch:
    """What a job page shows, sampled as it changes: the states in the order the page
    showed them (across the move to another MIG), and the screenshots taken."""

    def __init__(self, page, name):
        self.page, self.name = page, name
        self.states = []

    def sample(self):
        current = state(self.page)
        if current and (not self.states or self.states[-1] != current):
            self.states.append(current)
        return current

    def until(self, predicate, timeout=120, what="the page to show it"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.sample()
            if predicate(current):
                return current
            time.sleep(0.05)
        try:
            note = self.text("#source-note")
        except Exception:  # navigating
            note = "?"
        raise AssertionError(
            f"waited {timeout}s for {what}: the page ({self.page.url}) showed {self.states}, saying {note!r}"
        )

    def shot(self, label):
        path = ARTIFACTS / f"{self.name}-{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def never_went_back(self):
        ranks = [ORDER.index(s) for s in self.states]
        assert ranks == sorted(ranks), f"the page went back: {self.states}"

    def text(self, selector):
        return self.page.locator(selector).inner_text()


def submit(page, url, target_app, action, bwlimit=None, shot=None):
    """The form, then the plan, confirmed: returns the plan page's text."""
    page.goto(url)
    page.get_by_label("Target grid", exact=True).select_option("west")
    page.get_by_label("Target app name").fill(target_app)
    page.locator(f'input[name="action"][value="{action}"]').check()
    if bwlimit:
        page.get_by_label("Bandwidth limit (KiB/s)").fill(str(bwlimit))
    page.get_by_role("button", name="Review the plan").click()
    plan = page.locator("#plan").inner_text()
    if shot:
        page.screenshot(path=str(ARTIFACTS / f"{shot}-plan.png"), full_page=True)
    if action == "migrate":
        page.get_by_role("button", name="Migrate now").click()
        assert "Tick the box to confirm" in page.locator("main").inner_text()  # not without it
        page.get_by_label("I understand: east/shop is destroyed once it runs on west/").check()
        page.get_by_role("button", name="Migrate now").click()
    else:
        page.get_by_role("button", name="Take the snapshot").click()
    return plan


def log_in(page, url):
    """Log in, from the login page it is on or the one `url` sends it to; it lands on `url`."""
    if "/login/" not in page.url:
        page.goto(url)
    page.get_by_label("User name").fill("operator")
    page.get_by_label("Password").fill("s3cret pass")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda landed: landed.startswith(url))


def test_every_kind_of_job_in_the_browser(world, browser):
    """Snapshot, a cancelled migration, a failed one (its helper dies mid-copy), then the
    migration, each watched from the job page: what it shows at each step is true, its
    states never go back, and it ends final, with its whole log, without a reload."""
    ARTIFACTS.mkdir(exist_ok=True)
    world.provision(padding=2 << 20)
    east, west = world.url("east"), world.url("west")
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    log_in(page, east)

    # 1. A snapshot: the plan says the app stops briefly and nothing is destroyed.
    plan = submit(page, east, "copy", "snapshot")
    assert "this app stops for the final pass, then runs again here" in plan
    assert "the helper MigHelper_copy on west, when the job ends" in plan and "the source app" not in plan
    page.wait_for_url(f"{east}jobs/1/")
    watch = Watch(page, "snapshot")
    watch.until(lambda s: s == "done", what="the snapshot to end")
    watch.never_went_back()
    assert watch.text("#result-state") == "Done" and page.locator("#progress-block").is_hidden()
    assert "Snapshot complete" in watch.text("#log")  # the whole log, not a stale tail
    size = human_bytes(world.job("east", "shop", 1)["bytes_total"])
    assert watch.text("#result-bytes").startswith(f"{size} of data; ") and size.endswith(" MiB")
    watch.shot("done")
    page.get_by_role("link", name="the snapshot west/copy").click()
    row = page.locator("#snapshot-west-copy")
    assert "stopped" in row.inner_text() and row.get_by_role("link", name="Delete…").is_visible()
    watch.shot("listed")

    # 2. A migration, cancelled during its pre-copy: it rolls back as a failure would.
    submit(page, east, "shop", "migrate", bwlimit=40)
    page.wait_for_url(f"{east}jobs/2/")
    watch = Watch(page, "cancelled")
    watch.until(
        lambda s: s == "precopy" and page.eval_on_selector("#progress", "e => e.value > 0"),
        what="progress in the pre-copy",
    )
    assert "ETA" in watch.text("#progress-text")
    page.get_by_text("Cancel this job…").click()
    page.get_by_label("Cancel the job: the helper rolls back").check()
    page.get_by_role("button", name="Cancel the job").click()
    watch.until(lambda s: s == "cancelled", what="the cancel to end the job")
    watch.never_went_back()
    assert "Cancelled by operator during pre-copy: rolled back, the source app runs." in watch.text(
        "#failure"
    )
    assert watch.text("#app-source") == "running" and watch.text("#result-state") == "Cancelled"
    assert page.locator('#phases li[data-phase="precopy"]').get_attribute("class") == "failed"
    watch.shot("done")
    assert world.running("east", "shop") and world.state("west", "shop") is None

    # 3. A migration whose helper dies for good mid-copy: failed, and said so at once.
    submit(page, east, "shop", "migrate", bwlimit=40)
    page.wait_for_url(f"{east}jobs/3/")
    watch = Watch(page, "failed")
    watch.until(
        lambda s: s == "precopy" and page.eval_on_selector("#progress", "e => e.value > 0"),
        what="progress in the pre-copy",
    )
    world.kill_helper_app("west", "MigHelper_shop")
    watch.until(lambda s: s == "failed", timeout=60, what="the failure")
    watch.never_went_back()
    summary = watch.text("#failure-summary")
    assert summary.startswith("Pre-copy failed: the helper stopped before it reported a result"), summary
    assert watch.text("#result-state") == "Failed" and watch.text("#app-source") == "running"
    watch.shot("done")
    # On a phone the reasons wrap: nothing is wider than the screen.
    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    watch.shot("phone")
    page.set_viewport_size({"width": 1100, "height": 900})

    # 4. The migration: the page follows the app to the target's MIG and ends there.
    plan = submit(page, east, "shop", "migrate", bwlimit=200, shot="migrated")
    assert "the source app east/shop with its volumes" in plan
    watch = Watch(page, "migrated")
    # The page follows the app to the target's MIG, on another host: there, the same login
    # (which travelled with the app) is asked for once, and the page goes on where it was.
    watch.until(lambda s: "/login/" in page.url, what="the page to follow the app to the target")
    # It carries what it had shown: the target's page never shows less.
    assert page.url.startswith(f"{west}login/?next=/jobs/4/%3Fafter%3D"), page.url
    assert (
        "log in with the same user and password to follow the job" in page.locator("#followed").inner_text()
    )
    watch.shot("login-on-target")
    log_in(page, f"{west}jobs/4/")
    watch.until(lambda s: s == "done", what="the migration to end on the target")
    watch.never_went_back()
    assert page.url.startswith(f"{west}jobs/4/?after=")
    assert watch.text("#result-state") == "Done" and watch.text("#app-target") == "running"
    size = human_bytes(world.job("west", "shop", 4)["bytes_total"])
    assert watch.text("#result-bytes").startswith(f"{size} of data; ")
    assert page.get_by_role("link", name=f"the app runs at {west}").is_visible()
    assert "Migration complete" in watch.text("#log")
    watch.shot("done")

    # The history answers the questions: outcome, duration, downtime, data.
    page.goto(f"{west}jobs/")
    rows = page.locator("#history tbody tr")
    assert rows.count() == 4
    assert [rows.nth(i).locator(".state").inner_text() for i in range(4)] == [
        "Done",
        "Failed",
        "Cancelled",
        "Done",
    ]
    assert " s" in rows.nth(0).locator("td").nth(5).inner_text()  # the downtime
    time_text = rows.nth(0).locator("time").inner_text()
    assert len(time_text) == 19 and time_text[4] == "-" and time_text[10] == " "  # ISO-8601, local
    assert rows.nth(0).locator("time").get_attribute("title").endswith(" UTC")
    watch.shot("history")
    assert errors == []


def test_the_page_shows_what_the_helper_did_while_migs_record_lags(world, browser):
    """MIG's record of a job is filed by its runner, and the page asks the helper as well:
    with the runner stalled during the pre-copy (SIGSTOP), the page still shows the
    hashing and the live pass while MIG answers with what it had, and once the runner goes
    on, the job ends as ever."""
    ARTIFACTS.mkdir(exist_ok=True)
    world.provision(padding=2 << 20)
    east = world.url("east")
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    log_in(page, east)
    submit(page, east, "copy", "snapshot", bwlimit=200)  # about 15 s of pre-copy
    page.wait_for_url(f"{east}jobs/1/")
    watch = Watch(page, "runner-stalled")
    watch.until(
        lambda s: s == "precopy" and page.eval_on_selector("#progress", "e => e.value > 0"),
        what="progress in the pre-copy",
    )
    (runner,) = processes(b"run_job", cwd=world.app_dir("east", "shop") / "volumes/code")
    os.kill(runner, signal.SIGSTOP)
    try:
        # The helper waits for the runner's word before the stop (up to 30 s): meanwhile
        # only it can say how far it got.
        live_pass = "Settling the copy while the source runs"
        watch.until(lambda s: live_pass in watch.text("#log"), timeout=60, what="the helper's live pass")
        assert watch.sample() == "precopy"
        assert not any(live_pass in e["message"] for e in world.events("east", "shop", 1))
        watch.shot("live-pass")
    finally:
        os.kill(runner, signal.SIGCONT)
    watch.until(lambda s: s == "done", what="the snapshot to end")
    watch.never_went_back()
    assert "Snapshot complete" in watch.text("#log")  # MIG's final record, whole
    assert errors == []
