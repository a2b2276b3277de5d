"""The demo app's data component: keeps writing to its data volume, like a real app.

    datawriter.py DATA_DIR [FAIL_ON_GRID] [IGNORE_STOP]

Appends a line to journal.log every 0.2 s and rewrites counter.txt; exits on SIGTERM
after finishing the current write. Two ways to misbehave, for tests of failed migrations:
with FAIL_ON_GRID it refuses to start on that grid (an app tied to one place); with
IGNORE_STOP=yes it ignores SIGTERM (an app that will not stop).
"""

import os
import signal
import sys
import time

data_dir = sys.argv[1]
fail_on = sys.argv[2] if len(sys.argv) > 2 else ""
ignore_stop = len(sys.argv) > 3 and sys.argv[3] == "yes"
if fail_on and os.environ.get("MIG_GRID") == fail_on:
    sys.exit(f"datawriter: refusing to run on grid {fail_on}")

running = True


def stop(signum, frame):
    global running
    running = False


signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_stop else stop)
counter_file = os.path.join(data_dir, "counter.txt")
try:
    with open(counter_file) as f:
        count = int(f.read().strip() or 0)
except FileNotFoundError:
    count = 0
while running:
    count += 1
    with open(os.path.join(data_dir, "journal.log"), "a") as f:
        f.write(f"{time.time():.3f} {os.environ.get('MIG_GRID')}/{os.environ.get('MIG_APP')} {count}\n")
    tmp = counter_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{count}\n")
    os.replace(tmp, counter_file)
    time.sleep(0.2)
