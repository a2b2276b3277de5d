"""In a real browser: log in to the demo, migrate it, watch the monitor, land on the target.

Drives Debian's Chromium (/usr/bin/chromium) through Playwright; Playwright's own browser
download is not available on these machines. Screenshots go to test-artifacts/.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, mig_env

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.browser


def free_port_pair():
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", 0))
                port = a.getsockname()[1]
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            if port + 1 < 65535:
                return port
    raise RuntimeError("no two free ports in a row")


@pytest.fixture
def demo(tmp_path):
    """`manage.py demo`, as the README runs it; yields (url, password, port)."""
    port = free_port_pair()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--dir", str(tmp_path / "demo"), "--port", str(port)],
        cwd=ROOT,
        env=mig_env(tmp_path / "config"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
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
    page.get_by_label("Migrate — move this app to the target grid").check()
    # Slow enough to watch: about five seconds of pre-copy.
    page.get_by_label("Bandwidth limit (KiB/s)").fill("100")
    # A double click sends the form twice: there must still be one job.
    page.get_by_role("button", name="Start").dblclick()
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
    assert page.url == f"{target}jobs/1/", (page.url, seen)
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
