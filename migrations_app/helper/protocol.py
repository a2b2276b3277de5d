"""What MIG and its helper agree on: names, files and the progress line format."""

TEMPLATE = "MigHelper"
# Files MIG gives the helper, under the helper app's secrets/ (mode 0600).
SECRET_CONFIG = "config"
SECRET_KEY = "key"
SECRET_TOKEN = "token"
# Files the helper writes, relative to the helper app's directory.
WORK_VOLUME = "work"
PROGRESS_FILE = f"volumes/{WORK_VOLUME}/progress.jsonl"
STATUS_FILE = f"volumes/{WORK_VOLUME}/status.json"

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

# Facts the helper reports as events with a "fact" key; MIG acts on them.
TARGET_CREATED = "target_created"
# The source stops soon: MIG writes nothing more to its volumes (its database, its logs),
# so that the last listing before the final pass finds them still. Sent before the hashing,
# which leaves a follower lagging behind the progress log time to catch up.
HANDS_OFF = "hands_off"
# Downtime starts when the helper starts stopping the source: from then on it serves no one.
SOURCE_STOPPING = "source_stopping"
RESULT = "result"
