"""Copying volumes with rsync, watching its progress, and verifying the copy."""

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
    pass


@dataclass
class PassStats:
    """What one rsync pass moved."""

    changed_bytes: int = 0  # size of the files that differed
    literal_bytes: int = 0  # data actually sent
    seconds: float = 0.0


def rsync_argv(source, dest, remote_shell=None, bwlimit_kbps=None, stall_timeout=60):
    """rsync arguments copying directory `source` into `dest` (both ending in /)."""
    argv = [
        "rsync",
        "--archive",
        "--hard-links",
        "--numeric-ids",
        "--delete",
        "--protect-args",
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


def run_rsync(argv, on_progress, stall_timeout):
    """Run rsync, calling on_progress(bytes, percent) as it reports; return PassStats.

    If the byte count does not move for `stall_timeout` seconds, rsync is killed and the
    pass fails with that reason instead of hanging.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
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
                raise CopyError(f"the copy made no progress for {stall_timeout:g}s")
        status = proc.wait()
    finally:
        sel.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    # 24: files vanished while rsync ran. A live app deletes files (SQLite's -wal and -shm,
    # temporaries) during the pre-copy; the final pass and verify settle what remains.
    if status not in (0, RSYNC_VANISHED):
        lines = err.decode("utf-8", "replace").strip().splitlines()
        detail = "; ".join(line for line in lines if not line.startswith("rsync error:"))[-600:]
        raise CopyError(f"rsync failed (status {status}): {detail or '; '.join(lines[-2:])}")
    stats.seconds = time.monotonic() - start
    return stats
