"""A failure in one line an operator can act on (helper/failures.py), and the rate and ETA
the page shows (progress.RateMeter)."""

import errno
import sqlite3

import pytest

from migrations_app.grids import AuthError, HostKeyError, OperationFailed, TransportError
from migrations_app.helper import failures
from migrations_app.helper.copy import CopyError
from migrations_app.helper.progress import RateMeter
from migrations_app.helper.protocol import Cause

GRIDS = {"east": "mig@127.0.0.2:22", "west": "mig@127.0.0.3:22"}


@pytest.mark.parametrize(
    ("error", "cause", "where"),
    [
        (
            CopyError(
                "rsync failed (status 11): write failed: No space left on device (28)", CopyError.DISK_FULL
            ),
            Cause.DISK_FULL,
            "west",
        ),
        (OSError(errno.ENOSPC, "No space left on device"), Cause.DISK_FULL, "west"),
        (sqlite3.OperationalError("database or disk is full"), Cause.DISK_FULL, "west"),
        (
            OperationFailed("grid 'east': cannot write record: [Errno 30] Read-only file system"),
            Cause.READ_ONLY,
            "east",
        ),
        (
            TransportError("ssh mig@127.0.0.2:22: cannot connect: [Errno 111] Connection refused"),
            Cause.UNREACHABLE,
            "east",
        ),
        (HostKeyError("ssh mig@127.0.0.3:22: HOST KEY MISMATCH: ..."), Cause.HOST_KEY, "west"),
        (
            AuthError("ssh mig@127.0.0.2:22: the host refused key /k: Authentication failed"),
            Cause.DENIED,
            "east",
        ),
        ("verify failed, 3 difference(s): data/a size 1 ≠ 2", Cause.VERIFY_MISMATCH, "west"),
        (CopyError("the copy made no progress for 60s", CopyError.STALL), Cause.STALLED, "west"),
        ("the source app did not stop: grid 'east': app 'shop' did not stop within 5s", Cause.APP, "east"),
        (KeyError("x"), Cause.OTHER, "west"),
    ],
)
def test_each_cause_is_named_with_its_grid(error, cause, where):
    failure = failures.describe(error, "precopy", GRIDS, "west")
    assert failure.cause == cause
    assert failure.summary.startswith("Pre-copy failed: ") and "\n" not in failure.summary
    assert f" {where}" in failure.summary or cause in (Cause.VERIFY_MISMATCH, Cause.STALLED)
    assert failure.detail == (str(error) if not isinstance(error, KeyError) else "KeyError: 'x'")
    assert failure.phase == "precopy"


def test_a_cancel_says_who_and_when():
    failure = failures.cancelled("alice", "final_sync")
    assert failure.summary == "Cancelled by alice during final pass: rolled back, the source app runs."
    assert failure.cause == Cause.CANCELLED and failure.detail == ""


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_no_eta_until_it_can_be_told_then_from_the_recent_rate():
    clock = Clock()
    meter = RateMeter(1000, clock)
    # The first second moves almost nothing (connecting, listing files): no guess yet.
    clock.now += 1.0
    assert meter.update(1) == (1.0, None)
    # Then 100 bytes a second: the ETA follows what moves now, not the slow start.
    for _ in range(6):
        clock.now += 1.0
        rate, eta = meter.update(meter.samples[-1][1] + 100)
    assert rate == pytest.approx(100, rel=0.05)
    assert eta == pytest.approx((1000 - 601) / 100, rel=0.05)


def test_a_step_reporting_at_every_file_keeps_a_bounded_history():
    clock = Clock()
    meter = RateMeter(10**9, clock)
    for done in range(1, 300_001):  # 300,000 files in 10 s
        clock.now += 10 / 300_000
        rate, _ = meter.update(done * 1000)
    assert len(meter.samples) <= meter.WINDOW / meter.RESOLUTION + 2
    assert rate == pytest.approx(30_000 * 1000, rel=0.05)
