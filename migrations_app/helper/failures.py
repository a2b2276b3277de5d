"""Why a job failed, in one line an operator can act on (see protocol.Failure).

The tools' own words (rsync's output, the grid's message) are kept whole as the failure's
detail, once; the summary names the phase, the likely cause and where, and what to do.
"""

import errno
import re
import sqlite3

from ..grids import AuthError, GridError, HostKeyError, TransportError
from .copy import CopyError
from .protocol import LABELS, Cause, Failure

# Words in a message that give its cause away, whoever raised it (rsync, the agent, SQLite).
PATTERNS = [
    (re.compile(r"No space left|Disk quota exceeded|disk full|disk is full", re.I), Cause.DISK_FULL),
    (re.compile(r"Read-only file system", re.I), Cause.READ_ONLY),
    (re.compile(r"HOST KEY|host key (does not match|not recognised)", re.I), Cause.HOST_KEY),
    (re.compile(r"refused key|Permission denied|not writable", re.I), Cause.DENIED),
    (re.compile(r"verify failed", re.I), Cause.VERIFY_MISMATCH),
    (re.compile(r"made no progress", re.I), Cause.STALLED),
    (
        re.compile(
            r"cannot connect|connection (lost|unexpectedly closed|reset|refused|timed out)|"
            r"no answer within|unreachable|Broken pipe",
            re.I,
        ),
        Cause.UNREACHABLE,
    ),
    (re.compile(r"did not stop|failed to start|failed to restart|could not be started", re.I), Cause.APP),
]

ERRNOS = {
    errno.ENOSPC: Cause.DISK_FULL,
    errno.EDQUOT: Cause.DISK_FULL,
    errno.EROFS: Cause.READ_ONLY,
    errno.EACCES: Cause.DENIED,
    errno.EPERM: Cause.DENIED,
}

COPY_KINDS = {
    CopyError.DISK_FULL: Cause.DISK_FULL,
    CopyError.READ_ONLY: Cause.READ_ONLY,
    CopyError.DENIED: Cause.DENIED,
    CopyError.CONNECTION: Cause.UNREACHABLE,
    CopyError.STALL: Cause.STALLED,
}

# What to do about each cause; {where} is the grid (or host) it happened on.
ADVICE = {
    Cause.DISK_FULL: "disk full on {where}: free space there, or choose another grid, and try again",
    Cause.READ_ONLY: "a read-only file system on {where}: make the grid's root writable and try again",
    Cause.DENIED: "permission denied on {where}: the grid user needs to read and write the grid's root "
    "(and MIG's key must be in its authorized_keys)",
    Cause.UNREACHABLE: "{where} could not be reached: check that the host is up and its sshd answers, "
    "then try again",
    Cause.HOST_KEY: "{where} presented a host key other than the one grid.info pins: check the host, "
    "then correct host_key in grid.info",
    Cause.VERIFY_MISMATCH: "the copy did not match the stopped source, so it was not used: try again "
    "(if it happens again, something else writes to the app's volumes)",
    Cause.STALLED: "the copy moved no data for too long (MIG_STALL_TIMEOUT): check the network between "
    "the grids, then try again",
    Cause.APP: "the app did not do what it was asked: see its component logs on {where}",
    Cause.STOPPED: "the helper was stopped from outside before it finished",
    Cause.CANCELLED: "cancelled by an operator",
    Cause.OVER_BUDGET: "the downtime would have been over its budget, so the source kept running",
    Cause.LOST: "the helper is gone before it reported a result: see {where}'s helper log",
    Cause.OTHER: "an unexpected error: see the details below, and the helper's log on {where}",
}


def cause_of(error: BaseException | str) -> Cause:
    """The likely cause of `error` (an exception, or a message from elsewhere)."""
    if isinstance(error, CopyError) and error.kind in COPY_KINDS:
        return COPY_KINDS[error.kind]
    if isinstance(error, HostKeyError):
        return Cause.HOST_KEY
    if isinstance(error, AuthError):
        return Cause.DENIED
    if isinstance(error, OSError) and error.errno in ERRNOS:
        return ERRNOS[error.errno]
    text = str(error)
    for pattern, cause in PATTERNS:
        if pattern.search(text):
            return cause
    if isinstance(error, TransportError):
        return Cause.UNREACHABLE
    return Cause.OTHER


def where_of(text: str, grids: dict[str, str], default: str) -> str:
    """The grid a message is about: the first of `grids` ({name: address}) it mentions."""
    found = [(text.find(mark), name) for name, address in grids.items() for mark in (f"'{name}'", address)]
    found = [f for f in found if f[0] >= 0]
    return min(found)[1] if found else default


def describe(error: BaseException | str, phase: str, grids: dict[str, str], default: str) -> Failure:
    """A Failure for `error` during `phase`: `grids` maps the job's grids to their addresses
    (to tell which one a message is about), `default` is where the helper itself runs."""
    detail = error_text(error)
    cause = cause_of(error)
    where = where_of(detail, grids, default)
    label = LABELS.get(phase, phase.replace("_", " ").capitalize() or "The job")
    return Failure(
        summary=f"{label} failed: {ADVICE[cause].format(where=where)}.",
        cause=cause,
        phase=phase,
        detail=detail,
    )


def cancelled(by: str, phase: str) -> Failure:
    label = LABELS.get(phase, phase)
    return Failure(
        summary=f"Cancelled by {by} during {label.lower()}: rolled back, the source app runs.",
        cause=Cause.CANCELLED,
        phase=phase,
    )


def error_text(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    if isinstance(error, sqlite3.OperationalError | OSError | GridError | CopyError):
        return str(error)
    return f"{type(error).__name__}: {error}"
