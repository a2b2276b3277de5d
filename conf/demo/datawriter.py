"""The demo app's data component: keeps writing to its data volume, like a real app.

    datawriter.py DATA_DIR [FAIL_ON_GRID] [IGNORE_STOP] [CHURN] [ACK_LOG]

Appends a line to journal.log every 0.2 s (and fsyncs it) and rewrites counter.txt; exits
on SIGTERM after finishing the current write, or at once between writes. With CHURN (bytes
per second) it also rewrites, once it has listed them, that much of the data already in
the volume, in 64 KiB pieces at random places, big files as often as their size says: the
way a database changes its pages. With ACK_LOG (a file outside the app's volumes, or
tcp:HOST:PORT for a client that listens there), each line is acknowledged there once it is
on disk, as a server would answer its client: no acknowledged write may be lost.

Two ways to misbehave, for tests of failed migrations: with FAIL_ON_GRID it refuses to
start on that grid (an app tied to one place); with IGNORE_STOP=yes it ignores SIGTERM
(an app that will not stop).
"""

import bisect
import os
import random
import select
import signal
import socket
import sys
import threading
import time

PIECE = 64 * 1024
TICK = 0.2

data_dir = sys.argv[1]
fail_on = sys.argv[2] if len(sys.argv) > 2 else ""
ignore_stop = len(sys.argv) > 3 and sys.argv[3] == "yes"
churn = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] else 0
ack_log = sys.argv[5] if len(sys.argv) > 5 else ""
where = f"{os.environ.get('MIG_GRID')}/{os.environ.get('MIG_APP')}"
if fail_on and os.environ.get("MIG_GRID") == fail_on:
    sys.exit(f"datawriter: refusing to run on grid {fail_on}")

running = True
# The handler wakes the pause between writes: a stop need not wait for the tick to end.
wake_read, wake_write = os.pipe()


def stop(signum, frame):
    global running
    running = False
    os.write(wake_write, b".")


def existing_files():
    """(paths, cumulative sizes) of the data to churn, chosen in proportion to size."""
    paths, ends, total = [], [], 0
    for dirpath, _dirs, names in os.walk(data_dir):
        for name in names:
            if name in ("journal.log", "counter.txt", "counter.txt.tmp"):
                continue
            path = os.path.join(dirpath, name)
            size = os.path.getsize(path)
            if size:
                total += size
                paths.append(path)
                ends.append(total)
    return paths, ends


def churn_some(paths, ends, amount):
    while amount > 0 and paths:
        path = paths[bisect.bisect_right(ends, random.randrange(ends[-1]))]
        size = os.path.getsize(path)
        length = min(PIECE, size)
        with open(path, "r+b") as f:
            f.seek(random.randrange(size - length + 1))
            f.write(os.urandom(length))
        amount -= length


class Acknowledgements:
    """Where acknowledgements go: a file, or a client's connection (kept, made again when
    it breaks: no write is acknowledged until one is)."""

    def __init__(self, where):
        self.where = where
        self.sock = None

    def send(self, line):
        if not self.where.startswith("tcp:"):
            with open(self.where, "a") as f:
                f.write(line)
            return
        host, port = self.where[4:].rsplit(":", 1)
        while True:
            try:
                if self.sock is None:
                    self.sock = socket.create_connection((host, int(port)), timeout=5)
                self.sock.sendall(line.encode())
                return
            except OSError:
                self.sock = None
                time.sleep(0.05)


signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_stop else stop)
acks = Acknowledgements(ack_log) if ack_log else None
counter_file = os.path.join(data_dir, "counter.txt")
try:
    with open(counter_file) as f:
        count = int(f.read().strip() or 0)
except FileNotFoundError:
    count = 0
# The files to churn are listed in a thread at the lowest CPU priority (a Linux nice value
# is a thread's): at 200,000 files the walk takes 0.3 CPU-seconds, which it would otherwise
# take from the rest of the app starting beside it. Churning begins once it is done.
to_churn = ([], [])  # (paths, ends), replaced whole: the loop never sees half of it


def list_files_to_churn():
    global to_churn
    os.nice(19)
    to_churn = existing_files()


if churn:
    threading.Thread(target=list_files_to_churn, daemon=True).start()
while running:
    count += 1
    with open(os.path.join(data_dir, "journal.log"), "a") as f:
        f.write(f"{time.time():.3f} {where} {count}\n")
        f.flush()
        os.fsync(f.fileno())
    if acks:
        acks.send(f"{where} {count}\n")
    tmp = counter_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{count}\n")
    os.replace(tmp, counter_file)
    churn_some(*to_churn, int(churn * TICK))
    select.select([wake_read], [], [], TICK)
