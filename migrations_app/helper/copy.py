"""Copying volumes with rsync and watching its progress."""

import os
import re
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

RSYNC_VANISHED = 24
PROGRESS_RE = re.compile(rb"^\s*([\d,]+)\s+(\d+)%\s+(\S+)\s+(\d+:\d{2}:\d{2})")
STAT_RE = re.compile(rb"^(Total transferred file size|Literal data): ([\d,]+)")
STAT_FIELDS = {b"Total transferred file size": "changed_bytes", b"Literal data": "literal_bytes"}


class CopyError(Exception):
    """A pass failed; `kind` says how, when it is one an operator can act on."""

    DISK_FULL = "disk full"
    READ_ONLY = "read-only file system"
    DENIED = "permission denied"
    CONNECTION = "connection lost"  # worth another try
    STALL = "stalled"

    def __init__(self, message, kind=None):
        super().__init__(message)
        self.kind = kind


# rsync's exit statuses when its connection broke (see rsync(1), EXIT VALUES), and ssh's own.
CONNECTION_STATUSES = {10, 12, 35, 255}
KINDS = [
    (re.compile(r"No space left on device|Disk quota exceeded"), CopyError.DISK_FULL),
    (re.compile(r"Read-only file system"), CopyError.READ_ONLY),
    (re.compile(r"Permission denied \(13\)"), CopyError.DENIED),
    (re.compile(r"connection unexpectedly closed|Connection (reset|closed|refused|timed out)|Broken pipe"),
     CopyError.CONNECTION),
]  # fmt: skip


def failure_kind(status, stderr):
    for pattern, kind in KINDS:
        if pattern.search(stderr):
            return kind
    return CopyError.CONNECTION if status in CONNECTION_STATUSES else None


@dataclass
class PassStats:
    """What one rsync pass moved."""

    changed_bytes: int = 0  # size of the files that differed
    literal_bytes: int = 0  # data actually sent
    seconds: float = 0.0


def rsync_argv(source, dest, remote_shell=None, bwlimit_kbps=None, stall_timeout=60, protect_args=True):
    """rsync arguments copying directory `source` into `dest` (both ending in /).

    protect_args=False for a restricted source grid: its gate must see the paths on the
    command line (rsync 3.2.4 and later quote them safely there anyway)."""
    argv = [
        "rsync",
        "--archive",
        "--hard-links",
        "--sparse",
        "--xattrs",
        "--acls",
        "--numeric-ids",
        "--delete",
        # A pass cut short (a lost connection, a helper that died) leaves what it moved of a
        # file in place, and the next pass sends only the rest.
        "--partial",
        *(["--protect-args"] if protect_args else []),
        "--no-inc-recursive",
        "--info=progress2",
        "--stats",
        f"--timeout={int(stall_timeout)}",
    ]
    if bwlimit_kbps:
        argv.append(f"--bwlimit={int(bwlimit_kbps)}")
    if remote_shell:
        argv += ["-e", remote_shell]
    return [*argv, source, dest]


def stop_orphan(pid_file):
    """Kill an rsync that a helper which died left running (its pid file says which)."""
    try:
        with open(pid_file) as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            is_rsync = f.read().split(b"\0")[0].endswith(b"rsync")
    except (OSError, ValueError):
        return False
    if is_rsync:
        try:
            os.killpg(pid, signal.SIGKILL)  # its session: rsync and the ssh it runs
        except ProcessLookupError:
            return False
    return is_rsync


def run_rsync(argv, on_progress, stall_timeout, pid_file=None, check=None):
    """Run rsync, calling on_progress(bytes, percent) as it reports; return PassStats.

    If the byte count does not move for `stall_timeout` seconds, rsync is killed and the
    pass fails with that reason instead of hanging. Its pid is kept in `pid_file` while it
    runs, so that a helper restarted after dying can stop it. `check()` is called at least
    once a second: what it raises (a cancel) kills rsync and ends the pass.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    if pid_file:
        try:
            with open(pid_file, "w") as f:
                f.write(str(proc.pid))
        except OSError:  # a full disk: the pass fails on its own, and says so
            pid_file = None
    stats = PassStats()
    err = bytearray()
    buffer = b""
    last_change, last_bytes = time.monotonic(), -1
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    try:
        while sel.get_map():
            for key, _ in sel.select(1.0):
                data = os.read(key.fileobj.fileno(), 65536)
                if not data:
                    sel.unregister(key.fileobj)
                elif key.data == "err":
                    err += data
                else:
                    buffer += data
                    *pieces, buffer = re.split(rb"[\r\n]", buffer)
                    for piece in pieces:
                        if m := PROGRESS_RE.match(piece):
                            done = int(m.group(1).replace(b",", b""))
                            if done != last_bytes:
                                last_bytes, last_change = done, time.monotonic()
                            on_progress(done, int(m.group(2)))
                        elif m := STAT_RE.match(piece):
                            field = STAT_FIELDS[m.group(1)]
                            setattr(stats, field, int(m.group(2).replace(b",", b"")))
            if time.monotonic() - last_change > stall_timeout:
                raise CopyError(f"the copy made no progress for {stall_timeout:g}s", CopyError.STALL)
            if check is not None:
                check()
        status = proc.wait()
    finally:
        sel.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if pid_file:
            os.unlink(pid_file)
    # 24: files vanished while rsync ran. A live app deletes files (SQLite's -wal and -shm,
    # temporaries) during the pre-copy; the final pass and verify settle what remains.
    if status not in (0, RSYNC_VANISHED):
        text = err.decode("utf-8", "replace").strip()
        lines = text.splitlines()
        # rsync repeats one cause in many lines (each file, then a summary): keep one of each.
        unique = list(dict.fromkeys(line for line in lines if not line.startswith("rsync error:")))
        detail = "; ".join(unique)[-600:]
        raise CopyError(
            f"rsync failed (status {status}): {detail or '; '.join(lines[-2:])}", failure_kind(status, text)
        )
    stats.seconds = time.monotonic() - start
    return stats
