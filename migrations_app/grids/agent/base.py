"""What every part of the agent shares: its errors, name and path checks, and files written
whole or not at all."""

import json
import os
import re
import sys
import time
import uuid

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
# An image reference a docker grid runs: [registry/]name[:tag][@digest].
IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}\Z")
PACKAGE = os.path.dirname(os.path.abspath(__file__))


def agent_argv(*args):
    """How this agent runs itself again, as a process of its own (a supervisor, a watchdog):
    from the archive MIG installs it as, or, imported from MIG's source (the tests), from
    there."""
    archive = os.path.dirname(PACKAGE)
    if os.path.isfile(archive):
        return [sys.executable, archive, *args]
    project = os.path.dirname(os.path.dirname(archive))
    loader = (
        f"import sys; sys.path.insert(0, {project!r}); "
        "from migrations_app.grids.agent.ops import main; sys.exit(main())"
    )
    return [sys.executable, "-c", loader, *args]


class AgentError(Exception):
    kind = "OperationFailed"


class NotFound(AgentError):
    kind = "AppNotFound"


class Exists(AgentError):
    kind = "AppExists"


class Invalid(AgentError):
    kind = "InvalidName"


def shorten(value, limit=70):
    """`value` as repr() shows it, cut to `limit` characters: an error names what it
    refused without echoing a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_name(value, kind="app"):
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise Invalid(f"invalid {kind} name {shorten(value)}")
    return value


def check_relpath(value):
    """A path inside an app directory: relative, normalised, no way out."""
    norm = os.path.normpath(value)
    if not value or os.path.isabs(value) or norm != value or norm.split("/")[0] in ("..", "."):
        raise Invalid(f"invalid path {shorten(value)}: must be relative and stay inside the app")
    return value


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        if default is not None:
            return default
        raise


def read_json_or_none(path):
    """A JSON file written whole or not at all, or None if there is none."""
    try:
        return read_json(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as e:  # written whole or not at all: only a damaged disk does this
        raise AgentError(f"{path} is damaged ({e}): the cut-over cannot be read; see to it by hand") from None


def write_private(path, data):
    """Write `data` to `path`, readable by this user only, atomically."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(path, data, mode=0o644):
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_durably(path, data):
    """Write a new file and make it, and its name, survive a crash."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_dir(os.path.dirname(path))


def sync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path, mode=0o755):
    os.makedirs(path, mode=mode, exist_ok=True)
    return path


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def log_line(message):
    """`message` as a line of a component's log (what the agent writes there, and say())."""
    return f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"


def say(message):
    """A line in the log this process writes to (a component's, the watchdog's)."""
    print(log_line(message), end="", flush=True)
