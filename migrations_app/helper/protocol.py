"""What MIG and its helper agree on: names, files and the progress line format."""

import enum

TEMPLATE = "MigHelper"
# Files MIG gives the helper, under the helper app's secrets/ (mode 0600).
SECRET_CONFIG = "config"
SECRET_KEY = "key"
SECRET_TOKEN = "token"
# Files the helper writes, relative to the helper app's directory.
WORK_VOLUME = "work"
PROGRESS_FILE = f"volumes/{WORK_VOLUME}/progress.jsonl"
STATUS_FILE = f"volumes/{WORK_VOLUME}/status.json"
# MIG's runner writes this once it has seen HANDS_OFF and will write nothing more to the
# source's volumes; the helper waits for it (a while) before it hashes for the final pass.
HANDS_OFF_ACK_NAME = "hands-off.ack"
HANDS_OFF_ACK_FILE = f"volumes/{WORK_VOLUME}/{HANDS_OFF_ACK_NAME}"

# Line kinds in the progress log. Events are filed into the job's history; progress lines
# only update its counters (there are many of them).
EVENT = "event"
PROGRESS = "progress"

# Phases, in order, as the job's states name them.
PRECOPY = "precopy"
STOPPING = "stopping"
FINAL_SYNC = "final_sync"
VERIFYING = "verifying"
STARTING = "starting"
FINISHING = "finishing"
FAILED = "failed"

# Facts the helper reports as events with a "fact" key; MIG acts on them, and a restarted
# helper resumes from them (its journal is the truth about what it did).
# About to define the target: from here on the target may exist, and it is this job's.
TARGET_DEFINING = "target_defining"
# The source stops soon: MIG writes nothing more to its volumes (its database, its logs),
# so that what the final pass lists after the stop stays as it was. MIG's runner may lag
# behind the journal, and may live outside the app (started from a terminal): it says when
# it is done (HANDS_OFF_ACK_FILE), and the helper waits for that before it hashes.
HANDS_OFF = "hands_off"
# The index for the final pass is built (with the times it trusts: "clean_before_ns").
INDEXED = "indexed"
# The cut-over record is armed on the source grid, its watchdog running.
ARMED = "armed"
# Downtime starts when the helper starts stopping the source: from then on it serves no one.
SOURCE_STOPPING = "source_stopping"
SOURCE_STOPPED = "source_stopped"
FINAL_PASS_DONE = "final_pass_done"
VERIFIED = "verified"
# The cut-over decision that holds ("decision": commit | rollback, "by": who made it).
DECISION = "decision"
# The app that comes up after the cut-over (the target, or the source after a snapshot or a
# rollback) is being started, has started, and first answered at its published URL.
APP_STARTING = "app_starting"
APP_STARTED = "app_started"
APP_ANSWERED = "app_answered"
# A helper restarted by its grid picked up its journal.
RESUMED = "resumed"
RESULT = "result"


class Result(enum.StrEnum):
    """How the helper's work ended (the "result" of its RESULT line)."""

    OK = "ok"
    FAILED = "failed"
