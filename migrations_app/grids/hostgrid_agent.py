#!/usr/bin/env python3
"""
The hostgrid agent: does one operation on a grid directory, on the grid's own host.

MIG installs this file at <root>/.mig/agent-<version>.py and runs it through a transport:

    python3 agent.py ROOT OPERATION [ARGS...]

It prints one JSON object, {"ok": true, "result": ...} or {"ok": false, "error": KIND,
"message": ...}, except the streaming operations (follow, scan, delta) and the long-lived
ones it starts itself (supervise, a component's supervisor; watchdog, a cut-over's). `serve` answers
many operations, one per line: each request is a JSON list [OPERATION, ARGS...], each
answer that JSON object; one connection and one interpreter then serve a whole job. It
uses the Python standard library only, so a grid host needs nothing but Python (and rsync
for copies).

A grid is a directory:
    grid.json                   the grid's own name, app URL and app ports (written by `init`)
    catalog/<template>/         manifest.json and volumes/<name>/ with initial content
    apps/<app>/app.json         the manifest (and the app's port); an app exists once this file does
    apps/<app>/state.json       the desired state: running or stopped
    apps/<app>/volumes/<name>/  the app's data
    apps/<app>/run/<c>.pid      "<pid> <start time>" of each running component
    apps/<app>/run/<c>.env      what the component was told (MIG_GRID, MIG_APP, MIG_APP_URL, ...)
    apps/<app>/logs/<c>.log     each component's output
    apps/<app>/secrets/         files MIG puts there (mode 0600), never in a manifest
    apps/<app>/cutover/         the cut-over record of a migration from this app (see Cutover)
"""

import argparse
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
import uuid
from urllib.parse import urlsplit

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
PLACEHOLDER_RE = re.compile(r"\{([a-z_]+)(?::([A-Za-z0-9_-]+))?\}")
MANIFEST_FORMAT = 1
DEFAULT_STOP_GRACE = 10.0
DEFAULT_START_SETTLE = 0.5
PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ")
STATES = ("stopped", "starting", "running", "stopping", "failed", "unknown")


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


def ensure_dir(path, mode=0o755):
    os.makedirs(path, mode=mode, exist_ok=True)
    return path


# --- processes ---------------------------------------------------------------------------


def proc_stat(pid):
    """(state, session id, start time) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()
    return fields[0], int(fields[3]), fields[19]


def have_proc():
    return os.path.isdir("/proc/self")


def pid_alive(pid, start_time=None):
    if have_proc():
        info = proc_stat(pid)
        # A zombie has exited; a different start time means the pid was reused.
        if info is None or info[0] in ("Z", "X"):
            return False
        return start_time is None or info[2] == start_time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def session_members(sid):
    """Every live process in a component's session: the component and what it spawned."""
    if not have_proc():
        return [sid] if pid_alive(sid) else []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = proc_stat(int(entry))
            if info and info[1] == sid and info[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def session_of(pid):
    """The session a component's process is in: its own (a leader), or its dead leader's."""
    info = proc_stat(pid) if have_proc() else None
    return info[1] if info else pid


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# --- the grid ----------------------------------------------------------------------------


class Grid:
    def __init__(self, root):
        if not os.path.isabs(root) or os.path.normpath(root) != root or root == "/":
            raise Invalid(f"invalid grid root {shorten(root)}")
        self.root = root
        self.apps = os.path.join(root, "apps")
        self.catalog = os.path.join(root, "catalog")
        self.ops = set()  # apps whose state.json names an operation of this process

    def config(self):
        return read_json(os.path.join(self.root, "grid.json"), {})

    # where apps answer

    def app_url(self, app, manifest=None):
        """Where the grid publishes `app`: its app_url, with the app's own port if the grid
        gives each app one ({port})."""
        template = self.config().get("app_url", "")
        if "{port}" not in template:
            return template
        port = (manifest or self.manifest(app)).get("port")
        return template.replace("{port}", str(port)) if port else ""

    def assign_port(self, app):
        """The lowest port of the grid's app_ports that no other app has and nothing holds
        (call with the grid's lock held). None if the grid does not give apps ports."""
        config = self.config()
        if "{port}" not in config.get("app_url", ""):
            return None
        low, high = config["app_ports"]
        taken = set()
        for name in os.listdir(self.apps) if os.path.isdir(self.apps) else []:
            if NAME_RE.match(name) and name != app and self.exists(name):
                taken.add(read_json(os.path.join(self.app_dir(name), "app.json"), {}).get("port"))
        host = urlsplit(config["app_url"].replace("{port}", "1")).hostname or "127.0.0.1"
        for port in range(low, high + 1):
            if port not in taken and bindable(host, port):
                return port
        raise AgentError(
            f"no free port left in this grid's app_ports {low}-{high} ({len(taken)} apps have one): "
            "widen app_ports in grid.info and run `manage.py grids --init` again"
        )

    def grid_lock(self):
        """Serialise what concerns every app at once (handing out ports)."""
        ensure_dir(os.path.join(self.root, ".mig"))
        fd = os.open(os.path.join(self.root, ".mig", "grid.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def app_dir(self, app):
        return os.path.join(self.apps, check_name(app))

    def exists(self, app):
        return os.path.isfile(os.path.join(self.app_dir(app), "app.json"))

    def manifest(self, app):
        try:
            return read_json(os.path.join(self.app_dir(app), "app.json"))
        except FileNotFoundError:
            raise NotFound(f"app {app!r} does not exist on this grid") from None

    def lock(self, app):
        """Serialise operations on one app: start, stop and destroy must not interleave."""
        path = os.path.join(self.app_dir(app), ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    # state

    def pidfile(self, app, component):
        return os.path.join(self.app_dir(app), "run", f"{component}.pid")

    def component_pid(self, app, component):
        """The pid of a running component, or None (a stale pid file is not running).

        A component runs while anything in its session does: when its leader died (a
        supervisor killed, say), what it started may still be at work, and a stop must
        still reach it. A pid reused by another process is not the component.
        """
        try:
            with open(self.pidfile(app, component)) as f:
                pid, start_time = f.read().split()
        except (FileNotFoundError, ValueError):
            return None
        pid = int(pid)
        if not have_proc():
            return pid if pid_alive(pid) else None
        if pid_alive(pid, start_time):
            return pid
        info = proc_stat(pid)
        if info is not None and not (info[0] in ("Z", "X") and info[2] == start_time):
            return None  # reused: that session is someone else's
        members = session_members(pid)
        return members[0] if members else None

    def state(self, app):
        manifest = self.manifest(app)
        saved = read_json(os.path.join(self.app_dir(app), "state.json"), {})
        desired, op = saved.get("desired"), saved.get("op")
        if op and pid_alive(op["pid"], op.get("start_time")):
            return op["name"]
        alive = [self.component_pid(app, c["name"]) is not None for c in manifest["components"]]
        if not alive:
            return "running" if desired == "running" else "stopped"
        if all(alive):
            return "running" if desired == "running" else "stopping"
        if not any(alive) and desired != "running":
            return "stopped"
        return "failed"

    def set_state(self, app, desired, op=None):
        data = {"desired": desired}
        if op:
            info = proc_stat(os.getpid()) if have_proc() else None
            data["op"] = {"name": op, "pid": os.getpid(), "start_time": info[2] if info else None}
        write_json(os.path.join(self.app_dir(app), "state.json"), data)
        (self.ops.add if op else self.ops.discard)(app)

    def end_ops(self):
        """Clear the marks of operations that failed half-way.

        A mark names this process, and counts while it lives: a one-shot agent exits right
        after, but a serving one lives on and would keep the app "starting" forever.
        """
        for app in list(self.ops):
            desired = read_json(os.path.join(self.app_dir(app), "state.json"), {}).get("desired")
            self.set_state(app, desired or "stopped")

    # placeholders

    def expand(self, app, manifest, text, component):
        grid = self.config()

        def value(match):
            key, arg = match.group(1), match.group(2)
            if key == "volume" and arg in manifest["volumes"]:
                return os.path.join(self.app_dir(app), "volumes", arg)
            if key == "prop" and arg in manifest.get("properties", {}):
                return str(manifest["properties"][arg])
            if key == "secret" and arg:
                return os.path.join(self.app_dir(app), "secrets", arg)
            simple = {
                "app": app,
                "grid": grid.get("name", ""),
                "app_dir": self.app_dir(app),
                "app_url": self.app_url(app, manifest),
                "app_port": str(manifest.get("port") or urlsplit(self.app_url(app, manifest)).port or ""),
                "python": sys.executable,
            }
            if arg is None and key in simple:
                return simple[key]
            raise AgentError(f"component {component!r}: unknown placeholder {match.group(0)}")

        return PLACEHOLDER_RE.sub(value, text)


def validate_manifest(manifest):
    """Check a manifest's shape before anything is written from it."""
    if not isinstance(manifest, dict):
        raise AgentError("manifest must be a JSON object")
    volumes = manifest.get("volumes", [])
    components = manifest.get("components", [])
    if not isinstance(volumes, list) or not isinstance(components, list):
        raise AgentError("manifest volumes and components must be lists")
    for v in volumes:
        check_name(v, "volume")
    if len(set(volumes)) != len(volumes):
        raise AgentError("manifest volumes must be distinct")
    seen = set()
    for c in components:
        if not isinstance(c, dict) or not isinstance(c.get("command"), list) or not c["command"]:
            raise AgentError("each component needs a name and a non-empty command list")
        check_name(c.get("name"), "component")
        if c["name"] in seen:
            raise AgentError(f"component {c['name']!r} is listed twice")
        seen.add(c["name"])
        if not all(isinstance(a, str) and "\0" not in a for a in c["command"]):
            raise AgentError(f"component {c['name']!r}: command arguments must be strings")
        env = c.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and "\0" not in k + v and "=" not in k and k
            for k, v in env.items()
        ):
            raise AgentError(f"component {c['name']!r}: env must map names to strings")
        restarts = c.get("restarts", 0)
        if isinstance(restarts, bool) or not isinstance(restarts, int) or not 0 <= restarts <= 100:
            raise AgentError(f"component {c['name']!r}: restarts must be a whole number from 0 to 100")
    props = manifest.get("properties", {})
    if not isinstance(props, dict) or not all(v is None or isinstance(v, str) for v in props.values()):
        raise AgentError("manifest properties must be an object of strings (or null: required)")
    template = manifest.get("template", "")
    if not isinstance(template, str) or len(template) > 64:
        raise AgentError("manifest template must be a name")
    owner = manifest.get("owner", "")
    if not isinstance(owner, str) or len(owner) > 200:
        raise AgentError("manifest owner must be a string of at most 200 characters")
    clean = {
        "format": MANIFEST_FORMAT,
        "template": template,
        "properties": props,
        "volumes": volumes,
        "components": components,
        "owner": owner,
    }
    for key in ("start_settle", "stop_grace"):
        if key in manifest:
            value = manifest[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
                raise AgentError(f"manifest {key} must be a number of seconds from 0 to 3600")
            clean[key] = value
    return clean


# --- operations --------------------------------------------------------------------------


def op_info(grid, args):
    usage = shutil.disk_usage(grid.root) if os.path.isdir(grid.root) else None
    apps = sorted(a for a in os.listdir(grid.apps) if NAME_RE.match(a)) if os.path.isdir(grid.apps) else []
    writable = os.path.isdir(grid.apps) and os.access(grid.apps, os.W_OK | os.X_OK)
    return {
        "name": grid.config().get("name"),
        "app_url": grid.config().get("app_url"),
        "initialised": os.path.isfile(os.path.join(grid.root, "grid.json")),
        "writable": writable,
        "free_bytes": usage.free if usage else None,
        "total_bytes": usage.total if usage else None,
        "apps": len([a for a in apps if grid.exists(a)]),
        "python": sys.version.split()[0],
        "rsync": shutil.which("rsync") is not None,
        "time": time.time(),
    }


def op_init(grid, args):
    check_name(args.name, "grid")
    current = grid.config()
    if current.get("name") not in (None, args.name):
        raise AgentError(
            f"{grid.root} is already grid {current['name']!r}; refusing to call it {args.name!r}"
        )
    if ("{port}" in args.app_url) != (args.app_ports is not None):
        raise Invalid("an app_url with {port} needs app_ports, and app_ports an app_url with {port}")
    for path in (grid.root, grid.apps, grid.catalog):
        ensure_dir(path)
    wanted = {"format": 1, "name": args.name, "app_url": args.app_url}
    if args.app_ports is not None:
        wanted["app_ports"] = list(args.app_ports)
    changed = current != wanted
    if changed:
        write_json(os.path.join(grid.root, "grid.json"), wanted)
    return {"changed": changed}


def op_list(grid, args):
    if not os.path.isdir(grid.apps):
        return []
    apps = []
    for name in sorted(os.listdir(grid.apps)):
        if NAME_RE.match(name) and grid.exists(name):
            apps.append({"name": name, "state": safe_state(grid, name)})
    return apps


def safe_state(grid, app):
    try:
        return grid.state(app)
    except (OSError, ValueError, KeyError):
        return "unknown"


def op_state(grid, args):
    if not grid.exists(args.app):
        raise NotFound(f"app {args.app!r} does not exist on this grid")
    return grid.state(args.app)


def tree_size(path):
    total = files = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += st.st_size
            files += 1
    return total, files


def op_describe(grid, args):
    manifest = grid.manifest(args.app)
    app_dir = grid.app_dir(args.app)
    volumes = []
    for name in manifest["volumes"]:
        path = os.path.join(app_dir, "volumes", name)
        size, files = tree_size(path) if args.sizes else (None, None)
        volumes.append({"name": name, "path": path, "bytes": size, "files": files})
    components = [
        {"name": c["name"], "pid": grid.component_pid(args.app, c["name"]), "command": c["command"]}
        for c in manifest["components"]
    ]
    return {
        "name": args.app,
        "state": grid.state(args.app),
        "path": app_dir,
        "url": grid.app_url(args.app, manifest),
        "manifest": manifest,
        "volumes": volumes,
        "components": components,
    }


def make_app(grid, app, manifest, fill_volume=None):
    """Write an app's directories, then its manifest last: the manifest makes it exist. A
    grid that gives each app a port gives this one the lowest free one."""
    fd = grid.grid_lock()
    try:
        port = grid.assign_port(app) if not grid.exists(app) else None
        if port is not None:
            manifest = dict(manifest, port=port)
        write_app(grid, app, manifest, fill_volume)
    finally:
        os.close(fd)


def write_app(grid, app, manifest, fill_volume):
    if grid.exists(app):
        raise Exists(f"app {app!r} already exists on this grid")
    ensure_dir(grid.apps)
    app_dir = ensure_dir(grid.app_dir(app))
    for sub in ("run", "logs", "volumes"):
        ensure_dir(os.path.join(app_dir, sub))
    ensure_dir(os.path.join(app_dir, "secrets"), 0o700)
    os.chmod(os.path.join(app_dir, "secrets"), 0o700)
    for volume in manifest["volumes"]:
        path = ensure_dir(os.path.join(app_dir, "volumes", volume))
        if fill_volume:
            fill_volume(volume, path)
    write_json(os.path.join(app_dir, "state.json"), {"desired": "stopped"})
    write_json(os.path.join(app_dir, "app.json"), dict(manifest, name=app))


def op_create(grid, args):
    check_name(args.app)
    template_dir = os.path.join(grid.catalog, check_name(args.template, "template"))
    try:
        template = validate_manifest(read_json(os.path.join(template_dir, "manifest.json")))
    except FileNotFoundError:
        raise AgentError(f"template {args.template!r} is not in this grid's catalog") from None
    props = dict(template["properties"])
    for item in args.property or []:
        key, sep, value = item.partition("=")
        if not sep or key not in props:
            known = ", ".join(sorted(props)) or "none"
            raise AgentError(f"template {args.template!r} has no property {key!r} (known: {known})")
        props[key] = value
    missing = sorted(k for k, v in props.items() if v is None)
    if missing:
        raise AgentError(f"template {args.template!r} needs properties: {', '.join(missing)}")
    # Who created it: clean-up removes an app only if its owner is the job cleaning up.
    manifest = validate_manifest(dict(template, template=args.template, properties=props, owner=args.owner))

    def fill(volume, path):
        source = os.path.join(template_dir, "volumes", volume)
        if os.path.isdir(source):
            shutil.copytree(source, path, symlinks=True, dirs_exist_ok=True)

    make_app(grid, args.app, manifest, fill)
    return {"created": args.app}


def op_define(grid, args):
    check_name(args.app)
    try:
        manifest = json.loads(args.manifest)
    except json.JSONDecodeError as e:
        raise AgentError(f"manifest is not valid JSON: {e}") from None
    if isinstance(manifest, dict):
        # Who defined it: clean-up removes an app only if its owner is the job cleaning up.
        manifest["owner"] = args.owner
    make_app(grid, args.app, validate_manifest(manifest))
    return {"defined": args.app}


def start_component(grid, app, manifest, component):
    app_dir = grid.app_dir(app)
    config = grid.config()
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(
        MIG_GRID=config.get("name", ""),
        MIG_APP=app,
        MIG_APP_URL=grid.app_url(app, manifest),
    )
    name = component["name"]
    for key, value in component.get("env", {}).items():
        env[key] = grid.expand(app, manifest, value, name)
    # What the component is told, for an operator who runs a command as it would
    # (`set -a; . run/NAME.env`): the grid's variables and the manifest's, no secrets.
    own = {k: v for k, v in env.items() if k.startswith("MIG_") or k in component.get("env", {})}
    env_text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(own.items()))
    write_private(os.path.join(app_dir, "run", f"{name}.env"), env_text.encode())
    command = [grid.expand(app, manifest, a, name) for a in component["command"]]
    cwd = grid.expand(app, manifest, component.get("cwd", "{app_dir}"), name)
    if component.get("restarts"):
        # A supervisor runs it, and runs it again if it dies (see op_supervise).
        command = [sys.executable, os.path.abspath(__file__), grid.root, "supervise", app, name]
    log_path = os.path.join(app_dir, "logs", f"{name}.log")
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        log.flush()
        try:
            # Its own session: the component outlives this agent and the SSH connection,
            # and stop can find everything it spawned.
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            raise AgentError(f"component {name!r} cannot start {command[0]!r}: {e.strerror}") from None
    info = proc_stat(proc.pid) if have_proc() else None
    with open(grid.pidfile(app, name), "w") as f:
        f.write(f"{proc.pid} {info[2] if info else 0}\n")
    return proc


def bindable(host, port):
    """Whether nothing holds `port` on `host` now (a port handed out must be free). Where
    that cannot be told here (the app URL names a proxy, not this host), it is taken as free."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        return e.errno != errno.EADDRINUSE
    return True


def listening(host, port):
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def log_tail(grid, app, component, lines=5):
    path = os.path.join(grid.app_dir(app), "logs", f"{component}.log")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def op_start(grid, args):
    manifest = grid.manifest(args.app)
    fd = grid.lock(args.app)
    try:
        if refusal := Cutover(grid, args.app).start_refusal():
            raise AgentError(refusal)
        grid.set_state(args.app, "running", op="starting")
        started = []
        try:
            for component in manifest["components"]:
                if grid.component_pid(args.app, component["name"]) is None:
                    proc = start_component(grid, args.app, manifest, component)
                    started.append((component["name"], proc))
        except AgentError:
            stop_app(grid, args.app, manifest, grace=2.0, force=True)
            grid.set_state(args.app, "running")
            raise
        # Started means: still up after the manifest's settle time; or, with --listen,
        # listening where the grid publishes the app (within --timeout), the sooner and
        # surer sign for an app that serves. Not listening by then is reported, not fatal: a
        # proxy may front the app.
        url = urlsplit(grid.app_url(args.app, manifest)) if args.listen else None
        listen = (
            (url.hostname, url.port or (443 if url.scheme == "https" else 80))
            if url and url.hostname
            else None
        )
        wait = args.timeout if listen else float(manifest.get("start_settle", DEFAULT_START_SETTLE))
        deadline = time.monotonic() + (wait if started else 0)
        listens = None
        while True:
            dead = [(n, p) for n, p in started if p.poll() is not None]
            if dead:
                break
            if listen and listening(*listen):
                listens = True
                break
            if time.monotonic() >= deadline:
                listens = False if listen else None
                break
            time.sleep(0.02)
        if dead:
            name, proc = dead[0]
            stop_app(grid, args.app, manifest, grace=2.0, force=True)
            grid.set_state(args.app, "running")
            raise AgentError(
                f"component {name!r} exited at start with status {proc.returncode}: "
                f"{log_tail(grid, args.app, name) or 'no output'}"
            )
        grid.set_state(args.app, "running")
        return {"started": [n for n, _ in started], "listening": listens}
    finally:
        os.close(fd)


def stop_app(grid, app, manifest, grace, force):
    """SIGTERM every component's session, wait, then SIGKILL only if forced."""
    leaders = {}
    for c in manifest["components"]:
        pid = grid.component_pid(app, c["name"])
        if pid is not None:
            leaders[c["name"]] = pid
    members = {name: session_members(session_of(pid)) or [pid] for name, pid in leaders.items()}
    for pids in members.values():
        signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    # Polled often: the app is down from the signal on, and a migration waits for the end.
    while time.monotonic() < deadline and any(pid_alive(p) for ps in members.values() for p in ps):
        time.sleep(0.01)
    survivors = {n: [p for p in ps if pid_alive(p)] for n, ps in members.items()}
    survivors = {n: ps for n, ps in survivors.items() if ps}
    if survivors and force:
        for pids in survivors.values():
            signal_all(pids, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and any(pid_alive(p) for ps in survivors.values() for p in ps):
            time.sleep(0.05)
        survivors = {n: [p for p in ps if pid_alive(p)] for n, ps in survivors.items()}
        survivors = {n: ps for n, ps in survivors.items() if ps}
    for name in leaders:
        if name not in survivors:
            try:
                os.unlink(grid.pidfile(app, name))
            except FileNotFoundError:
                pass
    return survivors


def op_stop(grid, args):
    manifest = grid.manifest(args.app)
    fd = grid.lock(args.app)
    try:
        grid.set_state(args.app, "stopped", op="stopping")
        grace = args.grace
        if grace is None:
            grace = float(manifest.get("stop_grace", DEFAULT_STOP_GRACE))
        survivors = stop_app(grid, args.app, manifest, grace, args.force)
        if survivors:
            # Still partly running: say so instead of pretending it stopped.
            grid.set_state(args.app, "running")
            names = ", ".join(f"{n} (pid {ps[0]})" for n, ps in survivors.items())
            raise AgentError(f"app {args.app!r} did not stop within {grace:g}s of SIGTERM: {names}")
        grid.set_state(args.app, "stopped")
        return {"stopped": args.app}
    finally:
        os.close(fd)


def op_destroy(grid, args):
    """Remove an app with its data. With --owner, only if the app is that owner's (see
    op_define): otherwise it is kept, and the answer says so."""
    app_dir = grid.app_dir(args.app)
    if not os.path.isdir(app_dir):
        return {"existed": False, "leftovers": [], "kept": False}
    existed = grid.exists(args.app)
    if existed:
        fd = grid.lock(args.app)
        try:
            if args.owner is not None and grid.manifest(args.app).get("owner", "") != args.owner:
                return {"existed": True, "leftovers": [], "kept": True}
            survivors = stop_app(grid, args.app, grid.manifest(args.app), grace=5.0, force=True)
            if survivors:
                raise AgentError(f"app {args.app!r}: processes survived SIGKILL: {survivors}")
            # The app stops existing the moment its manifest goes, even if some data lingers.
            os.unlink(os.path.join(app_dir, "app.json"))
        finally:
            os.close(fd)
    leftovers = []

    def note(function, path, excinfo):
        leftovers.append(f"{path}: {excinfo[1].strerror if hasattr(excinfo[1], 'strerror') else excinfo[1]}")

    shutil.rmtree(app_dir, onerror=note)
    return {"existed": existed, "leftovers": leftovers, "kept": False}


def safe_members(tar):
    for member in tar.getmembers():
        name = os.path.normpath(member.name)
        if os.path.isabs(name) or name.split("/")[0] == ".." or member.isdev():
            raise AgentError(f"template archive has an unsafe member {member.name!r}")
        if member.issym() or member.islnk():
            raise AgentError(f"template archive has a link {member.name!r}")
        yield member


TEMPORARY_ARCHIVE_RE = re.compile(r"^tmp-[0-9a-f]{32}\.tar\.gz\Z")
VERSION_RE = re.compile(r"^[A-Za-z0-9._+-]{1,64}\Z")


def temporary_archive(grid, path):
    """An archive MIG put in the grid's own directory for this operation, which deletes it:
    nothing else may be named, so the agent never deletes anything of anyone else's."""
    if os.path.dirname(path) != os.path.join(grid.root, ".mig") or not TEMPORARY_ARCHIVE_RE.match(
        os.path.basename(path)
    ):
        raise Invalid(f"invalid archive {shorten(path)}: only MIG's own <root>/.mig/tmp-*.tar.gz")
    return path


def op_install_template(grid, args):
    name = check_name(args.template, "template")
    archive = temporary_archive(grid, args.archive)
    if not VERSION_RE.match(args.version):
        raise Invalid(f"invalid version {shorten(args.version)}")
    ensure_dir(grid.catalog)
    final = os.path.join(grid.catalog, name)
    staging = os.path.join(grid.catalog, f".{name}.{uuid.uuid4().hex}")
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(staging, members=safe_members(tar))
        except (tarfile.ReadError, EOFError) as e:
            free = shutil.disk_usage(grid.root).free
            cause = f"the grid's disk is full ({free} bytes free)" if free < 1 << 20 else "it was damaged"
            raise AgentError(f"template {name!r}: the archive cannot be read, {cause}: {e}") from None
        validate_manifest(read_json(os.path.join(staging, "manifest.json")))
        with open(os.path.join(staging, "VERSION"), "w") as f:
            f.write(args.version + "\n")
        old = None
        if os.path.isdir(final):
            old = f"{staging}.old"
            os.rename(final, old)
        os.rename(staging, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.unlink(archive)
    return {"installed": name, "version": args.version}


def op_template_version(grid, args):
    path = os.path.join(grid.catalog, check_name(args.template, "template"), "VERSION")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def open_app_file(grid, app, relpath):
    """A regular file of an app's, reached with no symlink followed (see parent_dir);
    FileNotFoundError if there is none."""
    try:
        with parent_dir(grid.app_dir(app), check_relpath(relpath)) as (dir_fd, name):
            return open_regular(name, dir_fd)
    except OSError as e:
        if not_there(e):
            raise FileNotFoundError(errno.ENOENT, "no such file", relpath) from None
        raise


def op_read(grid, args):
    try:
        with open_app_file(grid, args.app, args.path) as f:
            f.seek(args.offset)
            data = f.read(args.limit)
    except FileNotFoundError:
        return {"data": "", "offset": args.offset, "exists": False}
    return {"data": data.decode("utf-8", "replace"), "offset": args.offset + len(data), "exists": True}


def op_follow(grid, args):
    """Print a file's lines as they are appended, until its app stops running."""
    offset = args.offset
    pending = b""
    deadline = time.monotonic() + args.max_time
    while time.monotonic() < deadline:
        try:
            with open_app_file(grid, args.app, args.path) as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        if data:
            offset += len(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                sys.stdout.buffer.write(line + b"\n")
            sys.stdout.flush()
            continue
        if not grid.exists(args.app) or safe_state(grid, args.app) not in ("running", "starting"):
            break
        time.sleep(0.2)
    return None


# --- supervised components ---------------------------------------------------------------

RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)


def op_supervise(grid, args):
    """Run one component, and start it again each time it dies, at most its `restarts` times.

    The supervisor is the component's session leader (its pid is the one in the pid file), so
    a stop signals both: then the supervisor restarts nothing, waits for the component and
    leaves with its status. A component that exits with status 0 is done, not dead.
    """
    manifest = grid.manifest(args.app)
    component = next((c for c in manifest["components"] if c["name"] == args.component), None)
    if component is None:
        raise NotFound(f"app {args.app!r} has no component {args.component!r}")
    name = component["name"]
    command = [grid.expand(args.app, manifest, a, name) for a in component["command"]]
    cwd = grid.expand(args.app, manifest, component.get("cwd", "{app_dir}"), name)
    limit = int(component.get("restarts", 0))
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    restarts = 0
    while True:
        # Its output goes where the supervisor's goes: the component's log.
        child = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, close_fds=True)
        status = child.wait()
        if stopping or status == 0:
            sys.exit(0 if stopping else status)
        if restarts >= limit:
            say(f"{name} exited with status {status}; restarted {restarts} time(s) already: giving up")
            sys.exit(status if 0 < status < 256 else 1)
        delay = RESTART_DELAYS[min(restarts, len(RESTART_DELAYS) - 1)]
        restarts += 1
        say(f"{name} exited with status {status}; restart {restarts} of {limit} in {delay:g}s")
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.05)
        if stopping:
            sys.exit(0)


def say(message):
    """A line in the log this process writes to (a component's, the watchdog's)."""
    print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)


# --- the cut-over record ------------------------------------------------------------------
#
# One decision per migration, made once, durably, next to the source app: commit (the copy
# is the app from now on) or roll back (the source is). See DESIGN.md, "The cut-over
# protocol". The decision file is created with link(2): exactly one claimant succeeds, and
# the file is whole the moment it exists.

DECISIONS = ("commit", "rollback")
WATCH_INTERVAL = 0.2
WATCHDOG_START_ATTEMPTS = 5


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


def read_json_or_none(path):
    try:
        return read_json(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as e:  # written whole or not at all: only a damaged disk does this
        raise AgentError(f"{path} is damaged ({e}): the cut-over cannot be read; see to it by hand") from None


class Cutover:
    """The cut-over record of one app: <app>/cutover/ (never copied: not in a volume)."""

    def __init__(self, grid, app):
        self.grid, self.app = grid, app
        self.dir = os.path.join(grid.app_dir(app), "cutover")

    def path(self, name):
        return os.path.join(self.dir, name)

    def state(self):
        """The record as a dict, or None if there is none."""
        record = read_json_or_none(self.path("record.json"))
        if record is None:
            return None
        decision = read_json_or_none(self.path("decision")) or {}
        abandoned = read_json_or_none(self.path("abandoned"))
        try:
            heartbeat_age = max(0.0, time.time() - os.stat(self.path("heartbeat")).st_mtime)
        except FileNotFoundError:
            heartbeat_age = None
        return {
            **record,
            "decision": decision.get("decision"),
            "decided_by": decision.get("by", ""),
            "decided_at": decision.get("at"),
            "reason": decision.get("reason", ""),
            "abandoned": abandoned is not None,
            "closed": os.path.exists(self.path("closed")),
            "heartbeat_age": heartbeat_age,
            "watchdog": self.watchdog_pid() is not None,
        }

    def current(self, job):
        """The record, which must be `job`'s."""
        state = self.state()
        if state is None or state["job"] != job:
            raise NotFound(f"app {self.app!r} has no cut-over record for this job")
        return state

    def start_refusal(self):
        """Why the app must not start now, or None. What "never both" rests on."""
        state = self.state()
        if state is None:
            return None
        job = f"job #{state['job_id']}"
        if state["decision"] is None:
            return (
                f"refusing to start {self.app}: a cut-over ({job}) is under way and not decided; "
                f"if that job is over, run `manage.py recover {state['job_id']}` in the app's MIG"
            )
        if state["decision"] == "commit" and state["action"] == "migrate" and not state["abandoned"]:
            return (
                f"refusing to start {self.app}: it moved to {state['target']} ({job} committed at "
                f"{state['decided_at']}), and both copies would take writes; to undo a move whose "
                f"target never started, run `manage.py recover {state['job_id']} --give-up-target`"
            )
        return None

    def arm(self, job, job_id, action, target, timeout):
        current = self.state()
        if current is not None and current["job"] != job:
            if self.start_refusal() is not None:
                raise AgentError(
                    f"app {self.app!r}: the cut-over of job #{current['job_id']} is not finished"
                )
            shutil.rmtree(self.dir)
            current = None
        if current is None:
            ensure_dir(self.dir, 0o700)
            record = {
                "job": job,
                "job_id": job_id,
                "action": action,
                "target": target,
                "timeout": timeout,
                "armed_at": time.time(),
            }
            tmp = self.path(f".record.{uuid.uuid4().hex}.tmp")
            write_durably(tmp, json.dumps(record).encode())
            os.replace(tmp, self.path("record.json"))
            sync_dir(self.dir)
        self.beat(job)
        if self.watchdog_pid() is None:
            self.start_watchdog(job)
        return self.state()

    def beat(self, job):
        self.current(job)
        path = self.path("heartbeat")
        try:
            os.utime(path)
        except FileNotFoundError:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    def claim(self, job, decision, by, reason):
        """Make `decision` unless one was made; returns the state, with the one that holds."""
        if decision not in DECISIONS:
            raise Invalid(f"a decision is one of {', '.join(DECISIONS)}, not {decision!r}")
        self.current(job)
        self.link_once("decision", {"decision": decision, "by": by, "reason": reason, "at": now()})
        return self.state()

    def abandon(self, job, by, reason):
        """Give up a committed target that never started: the source may start again."""
        state = self.current(job)
        if state["decision"] != "commit":
            raise AgentError(f"app {self.app!r}: job #{state['job_id']} did not commit: nothing to give up")
        self.link_once("abandoned", {"by": by, "reason": reason, "at": now()})
        return self.state()

    def link_once(self, name, content):
        tmp = self.path(f".{name}.{uuid.uuid4().hex}.tmp")
        write_durably(tmp, json.dumps(content).encode())
        try:
            os.link(tmp, self.path(name))
        except FileExistsError:
            pass  # someone was first: theirs holds
        finally:
            os.unlink(tmp)
        sync_dir(self.dir)

    def close(self, job):
        self.current(job)
        if not os.path.exists(self.path("closed")):
            write_durably(self.path("closed"), now().encode())
        return self.state()

    def clear(self, job):
        state = self.state()
        if state is None or state["job"] != job:
            return False
        shutil.rmtree(self.dir)
        return True

    def watchdog_pid(self):
        try:
            with open(self.path("watchdog.pid")) as f:
                pid, start_time = f.read().split()
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return int(pid) if pid_alive(int(pid), start_time if have_proc() else None) else None

    def start_watchdog(self, job):
        with open(self.path("watchdog.log"), "ab") as log:
            # Its own session: it outlives this agent, the connection and the helper.
            agent = os.path.abspath(__file__)
            proc = subprocess.Popen(
                [sys.executable, agent, self.grid.root, "watchdog", self.app, "--job", job],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        info = proc_stat(proc.pid) if have_proc() else None
        with open(self.path("watchdog.pid"), "w") as f:
            f.write(f"{proc.pid} {info[2] if info else 0}\n")


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def op_watchdog(grid, args):
    """Roll back a cut-over whose helper went silent before its decision was carried out.

    Claims rollback once the heartbeat is older than the record's timeout. If rollback holds
    (or the job is a snapshot, whose source restarts either way), starts the source app; if a
    migration's commit holds, the target side goes on, and it leaves the source alone.
    """
    cut = Cutover(grid, args.app)
    say(f"watching the cut-over of {args.app} (pid {os.getpid()})")
    while True:
        state = cut.state()
        if state is None or state["job"] != args.job:
            say("the record is gone or belongs to another job: leaving")
            return
        if state["closed"]:
            say("the helper carried out the decision: leaving")
            return
        age = state["heartbeat_age"]
        if age is None or age > state["timeout"]:
            break
        time.sleep(WATCH_INTERVAL)
    silent = "no heartbeat" if age is None else f"no heartbeat for {age:.0f}s"
    state = cut.claim(args.job, "rollback", "watchdog", f"the helper gave no sign of life ({silent})")
    say(f"{silent}: the decision is {state['decision']} (by {state['decided_by']})")
    if state["decision"] == "commit" and state["action"] == "migrate" and not state["abandoned"]:
        say("committed: the target is the app now; not starting the source")
        return
    start = parser().parse_args([grid.root, "start", args.app])
    for attempt in range(1, WATCHDOG_START_ATTEMPTS + 1):
        try:
            op_start(grid, start)
            say(f"started {args.app}")
            return
        except (AgentError, OSError) as e:
            say(f"could not start {args.app} (attempt {attempt}): {e}")
        finally:
            grid.end_ops()
        time.sleep(RESTART_DELAYS[min(attempt - 1, len(RESTART_DELAYS) - 1)])
    sys.exit(1)


def op_cutover(grid, args):
    """The cut-over record operations; each answers the record's state (see Cutover)."""
    cut = Cutover(grid, args.app)
    if args.op == "cutover-read":
        return cut.state()
    grid.manifest(args.app)  # the app must exist
    if args.op == "cutover-arm":
        if args.action not in ("migrate", "snapshot"):
            raise Invalid(f"invalid action {args.action!r}")
        fd = grid.lock(args.app)
        try:
            return cut.arm(args.job, args.job_id, args.action, args.target, args.timeout)
        finally:
            os.close(fd)
    if args.op == "cutover-beat":
        cut.beat(args.job)
        return {"beat": True}
    if args.op == "cutover-claim":
        fd = grid.lock(args.app)  # a claim and a start's check never interleave
        try:
            return cut.claim(args.job, args.decision, args.by, args.reason)
        finally:
            os.close(fd)
    if args.op == "cutover-abandon":
        return cut.abandon(args.job, args.by, args.reason)
    if args.op == "cutover-close":
        return cut.close(args.job)
    return {"cleared": cut.clear(args.job)}


# --- copying and verifying trees ----------------------------------------------------------
#
# The helper copies with rsync while the app runs; these functions serve the final pass,
# after the app stopped, and the verification. A file is hashed in blocks of BLOCK bytes
# (sha256, cut to 16 bytes); its digest is the sha256 of its block hashes, so either side
# can compute it from blocks it already hashed, without reading the file twice.

BLOCK = 64 * 1024
HASH_BYTES = 16
ZEROS = bytes(BLOCK)


# --- paths under an app's volumes: no symlink followed -----------------------------------
#
# An app shapes its volumes as it likes: any name in them may be a symlink to anywhere, and
# may become one at any moment while the app runs. So nothing under them is reached by a
# path the kernel resolves: each directory on the way is opened with O_NOFOLLOW, and the
# last name is used relative to its directory's descriptor, without following it.

DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What opening a path whose directories are not all real directories fails with.
NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def not_there(error):
    """Whether an OSError means the path is gone, or leads through something not a directory."""
    return isinstance(error, OSError) and error.errno in NOT_THERE


class parent_dir:
    """`with parent_dir(base, rel) as (fd, name)`: the directory holding `rel` under `base`,
    opened one real directory at a time; OSError (see NOT_THERE) where one is not."""

    def __init__(self, base, rel):
        *self.dirs, self.name = rel.split("/")
        self.base = base
        self.fd = None

    def open(self):
        self.fd = os.open(self.base, DIRECTORY)
        try:
            for name in self.dirs:
                inner = os.open(name, DIRECTORY, dir_fd=self.fd)
                os.close(self.fd)
                self.fd = inner
        except BaseException:
            self.close()
            raise
        return self.fd, self.name

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


def open_regular(name, dir_fd, flags=os.O_RDONLY, mode=0o600):
    """A regular file `name` in the directory `dir_fd`, opened without following a symlink
    (and without blocking on a fifo), as a file object. FileNotFoundError if it is not a
    regular file."""
    # Look before opening: opening a device may do something by itself (a tape rewinds).
    try:
        found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        if not stat.S_ISREG(found.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a regular file", name)
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the look and the open
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "not a regular file", name)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+b" if flags & os.O_RDWR else "wb" if flags & os.O_WRONLY else "rb")


def leaf_path(dir_fd, name):
    """A path to `name` in `dir_fd` for the calls that take no descriptor (the xattr ones):
    through /proc, so no directory on the way is looked up again. Use it only with
    follow_symlinks=False."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def tree_entries(base):
    """(relative path, lstat, descriptor of its directory, name) of everything under `base`,
    depth first, names sorted at each level: the order of sort_key(), which both sides share.
    The descriptor is good until the next entry is taken. Only real directories are entered.
    Memory stays flat: one listing per directory level at a time."""
    try:
        root = os.open(base, DIRECTORY)
    except FileNotFoundError:
        return
    stack = [("", root, iter(sorted(os.listdir(root))))]
    try:
        while stack:
            rel_dir, fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(fd)
                stack.pop()
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:  # removed while the app runs
                continue
            yield rel, st, fd, name
            if stat.S_ISDIR(st.st_mode):
                try:
                    inner = os.open(name, DIRECTORY, dir_fd=fd)
                except OSError as e:
                    if not not_there(e):
                        raise
                    continue  # removed, or replaced by a symlink, while the app runs
                stack.append((rel, inner, iter(sorted(os.listdir(inner)))))
    finally:
        for _, fd, _ in stack:
            os.close(fd)


def sort_key(rel):
    """The order tree_entries() yields paths in: depth-first, names sorted at each level."""
    return rel.split("/")


# Extended attributes a copy keeps and verify compares: every namespace but security.*,
# whose labels belong to the host's policy. POSIX ACLs are system.posix_acl_* attributes.
XATTR_SKIPPED = ("security.",)
KINDS = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
}


def xattrs(path):
    """{name: value as hex} of a file's extended attributes (links not followed; see
    leaf_path)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):  # none on this file system, or on links
            return {}
        raise
    found = {}
    for name in sorted(names):
        if not name.startswith(XATTR_SKIPPED):
            try:
                found[name] = os.getxattr(path, name, follow_symlinks=False).hex()
            except OSError as e:
                if e.errno != errno.ENODATA:  # removed meanwhile
                    raise
    return found


def describe_entry(rel, st, dir_fd, name):
    """A file system entry as both sides of a copy describe it, one letter per field:

    p path, k kind (f file, d directory, l symlink, p fifo, s socket, c/b device), m mode,
    u/g owner, t mtime (ns), s size and a allocated bytes (files), l target (links), r device
    number (devices), x extended attributes (when any), i "device:inode" and n link count
    (files with more than one name).
    """
    kind = KINDS[stat.S_IFMT(st.st_mode)]
    entry = {"p": rel, "k": kind, "m": stat.S_IMODE(st.st_mode), "u": st.st_uid, "g": st.st_gid}
    entry["t"] = st.st_mtime_ns
    if kind == "f":
        entry.update(s=st.st_size, a=st.st_blocks * 512)
        if st.st_nlink > 1:
            entry.update(i=f"{st.st_dev}:{st.st_ino}", n=st.st_nlink)
    elif kind == "l":
        try:
            entry["l"] = os.readlink(name, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.EINVAL:  # no longer a symlink: it changed since it was listed
                raise FileNotFoundError(errno.ENOENT, "changed while listed", name) from None
            raise
    elif kind in ("c", "b"):
        entry["r"] = st.st_rdev
    if found := xattrs(leaf_path(dir_fd, name)):
        entry["x"] = found
    return entry


def all_zeros(data):
    """Whether a block is zeros only (compared whole: slicing ZEROS would copy it)."""
    return data == ZEROS if len(data) == BLOCK else data.count(0) == len(data)


def block_hashes(f, on_block=None):
    """(block hashes, file digest) of an open file; on_block(index, data, hash) sees each
    block."""
    hashes = []
    while data := f.read(BLOCK):
        h = hashlib.sha256(data).digest()[:HASH_BYTES]
        if on_block:
            on_block(len(hashes), data, h)
        hashes.append(h)
    return hashes, file_digest(hashes)


def file_digest(hashes):
    return hashlib.sha256(b"".join(hashes)).hexdigest()


def volumes_dir(grid, app):
    grid.manifest(app)
    return os.path.join(grid.app_dir(app), "volumes")


def widen_pipe(stream):
    """A 1 MiB pipe instead of 64 KiB: the reader wakes up less often per byte sent."""
    try:
        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:  # not a pipe, or the system's limit is lower: the default works too
        pass


def emit(entry):
    sys.stdout.write(json.dumps(entry, separators=(",", ":")) + "\n")


def hashed_entry(entry, dir_fd, name):
    """`entry` with its file's block hashes ("b"), digest ("d"), and the file's change time
    once read ("c"): a later time than the listing's means it changed while it was read.
    None if it is gone or no longer a file (changed while the app runs: the final pass
    will see)."""
    try:
        with open_regular(name, dir_fd) as f:
            hashes, entry["d"] = block_hashes(f)
            entry["c"] = os.fstat(f.fileno()).st_ctime_ns
    except OSError as e:
        if not_there(e):
            return None
        raise
    entry["b"] = b"".join(hashes).hex()
    return entry


def op_scan(grid, args):
    """Every entry of an app's volumes, one JSON line each; --hashes adds block hashes.

    --wait: first wait for a line on stdin (and list nothing if it closes instead), so the
    listing can be set up before the app stops and begin the moment it has.
    """
    base = volumes_dir(grid, args.app)
    if args.wait and not sys.stdin.readline():
        return
    for rel, st, dir_fd, name in tree_entries(base):
        try:
            entry = describe_entry(rel, st, dir_fd, name)
        except OSError as e:
            if not_there(e):
                continue  # removed while the app runs: the final pass lists the stopped source
            raise
        if args.hashes and entry["k"] == "f":
            entry = hashed_entry(entry, dir_fd, name)
        if entry is not None:
            emit(entry)
    sys.stdout.flush()


def op_delta(grid, args):
    """The blocks of files that differ from what the other side has.

    Reads requests on stdin, one JSON line each: {"p": path, "b": hex of that side's block
    hashes}. Answers, for each, on stdout:
        F <path as JSON>\n
        B <index> <length>\n<data>     for each block whose hash differs
        Z <index> <length>\n           for such a block that is all zeros (a hole, maybe)
        E <JSON: the file's entry (see describe_entry), and "d" its digest>\n
    or `X <path as JSON>\n` if it is gone or no longer a regular file.
    """
    base = volumes_dir(grid, args.app)
    out = sys.stdout.buffer
    widen_pipe(out)
    for line in sys.stdin:
        request = json.loads(line)
        rel = check_relpath(request["p"])
        theirs = bytes.fromhex(request.get("b", ""))

        def send(index, data, h, theirs=theirs):
            if theirs[index * HASH_BYTES : (index + 1) * HASH_BYTES] != h:
                if all_zeros(data):
                    out.write(b"Z %d %d\n" % (index, len(data)))
                else:
                    out.write(b"B %d %d\n" % (index, len(data)) + data)  # one write, not two

        try:
            with parent_dir(base, rel) as (dir_fd, name), open_regular(name, dir_fd) as f:
                end = describe_entry(rel, os.fstat(f.fileno()), dir_fd, name)
                data_fd = os.dup(f.fileno())
        except OSError as e:
            if not not_there(e):
                raise
            out.write(b"X " + json.dumps(rel).encode() + b"\n")  # gone, or no longer a file
            continue
        out.write(b"F " + json.dumps(rel).encode() + b"\n")
        with os.fdopen(data_fd, "rb") as f:
            _, end["d"] = block_hashes(f, send)
        out.write(b"E " + json.dumps(end).encode() + b"\n")
    out.flush()


# These write their own output instead of one JSON answer.
STREAMING = ("follow", "scan", "delta", "supervise", "watchdog")
CUTOVER_OPS = ("cutover-arm", "cutover-beat", "cutover-claim", "cutover-abandon", "cutover-close")
CUTOVER_OPS += ("cutover-read", "cutover-clear")

OPERATIONS = {
    "info": op_info,
    "init": op_init,
    "list": op_list,
    "state": op_state,
    "describe": op_describe,
    "create": op_create,
    "define": op_define,
    "start": op_start,
    "stop": op_stop,
    "destroy": op_destroy,
    "install-template": op_install_template,
    "template-version": op_template_version,
    "read": op_read,
    "follow": op_follow,
    "scan": op_scan,
    "delta": op_delta,
    "supervise": op_supervise,
    "watchdog": op_watchdog,
    **dict.fromkeys(CUTOVER_OPS, op_cutover),
}


class Parser(argparse.ArgumentParser):
    """Bad arguments are an answer like any other error, not an exit: `serve` goes on.
    No --help either, which would print into the answers: this module's docstring is it."""

    def __init__(self, **kwargs):
        super().__init__(add_help=False, **kwargs)

    def error(self, message):
        raise AgentError(f"{self.prog}: {message}")


def number(low, high, kind=float):
    """An argument type: a finite number from `low` to `high`."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # NaN compares false: refused too
            raise argparse.ArgumentTypeError(f"must be a number from {low} to {high}, not {shorten(text)}")
        return value

    return parse


SECONDS = number(0.0, 7 * 86400.0)
OFFSET = number(0, 1 << 62, int)


def port_range(text):
    """An argument type: "LOW-HIGH", ports from 1 to 65535, LOW <= HIGH."""
    low, sep, high = text.partition("-")
    try:
        low, high = int(low), int(high)
    except ValueError:
        low = high = 0
    if not sep or not 1 <= low <= high <= 65535:
        raise argparse.ArgumentTypeError(f"must be LOW-HIGH, ports from 1 to 65535, not {shorten(text)}")
    return low, high


def parser():
    p = Parser(prog="hostgrid-agent")
    p.add_argument("root")
    sub = p.add_subparsers(dest="op", required=True, parser_class=Parser)
    sub.add_parser("serve")
    sub.add_parser("info")
    s = sub.add_parser("init")
    s.add_argument("--name", required=True)
    s.add_argument("--app-url", default="")
    s.add_argument("--app-ports", type=port_range)
    sub.add_parser("list")
    sub.add_parser("state").add_argument("app")
    s = sub.add_parser("destroy")
    s.add_argument("app")
    s.add_argument("--owner")
    s = sub.add_parser("start")
    s.add_argument("app")
    s.add_argument("--listen", action="store_true")
    s.add_argument("--timeout", type=SECONDS, default=60.0)
    s = sub.add_parser("describe")
    s.add_argument("app")
    s.add_argument("--sizes", action="store_true")
    s = sub.add_parser("stop")
    s.add_argument("app")
    s.add_argument("--grace", type=SECONDS)
    s.add_argument("--force", action="store_true")
    s = sub.add_parser("create")
    s.add_argument("app")
    s.add_argument("--template", required=True)
    s.add_argument("--property", action="append")
    s.add_argument("--owner", default="")
    s = sub.add_parser("define")
    s.add_argument("app")
    s.add_argument("--manifest", required=True)
    s.add_argument("--owner", default="")
    s = sub.add_parser("install-template")
    s.add_argument("template")
    s.add_argument("--archive", required=True)
    s.add_argument("--version", required=True)
    sub.add_parser("template-version").add_argument("template")
    s = sub.add_parser("read")
    s.add_argument("app")
    s.add_argument("path")
    s.add_argument("--offset", type=OFFSET, default=0)
    s.add_argument("--limit", type=number(0, 16 << 20, int), default=1 << 20)
    s = sub.add_parser("follow")
    s.add_argument("app")
    s.add_argument("path")
    s.add_argument("--offset", type=OFFSET, default=0)
    s.add_argument("--max-time", type=SECONDS, default=86400.0)
    s = sub.add_parser("scan")
    s.add_argument("app")
    s.add_argument("--hashes", action="store_true")
    s.add_argument("--wait", action="store_true")
    sub.add_parser("delta").add_argument("app")
    s = sub.add_parser("supervise")
    s.add_argument("app")
    s.add_argument("component")
    s = sub.add_parser("watchdog")
    s.add_argument("app")
    s.add_argument("--job", required=True)
    for op in CUTOVER_OPS:
        s = sub.add_parser(op)
        s.add_argument("app")
        if op != "cutover-read":
            s.add_argument("--job", required=True)
    s = sub.choices["cutover-arm"]
    s.add_argument("--job-id", type=number(1, 1 << 62, int), required=True)
    s.add_argument("--action", required=True)
    s.add_argument("--target", required=True)
    s.add_argument("--timeout", type=SECONDS, required=True)
    for op in ("cutover-claim", "cutover-abandon"):
        sub.choices[op].add_argument("--by", required=True)
        sub.choices[op].add_argument("--reason", default="")
    sub.choices["cutover-claim"].add_argument("--decision", required=True)
    return p


MESSAGE_LIMIT = 1000


def shortened(message):
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 1] + "…"


def answer(argv, served=False):
    """Do one operation; its JSON answer, or None once a streaming one has written its own."""
    grid = args = None
    try:
        args = parser().parse_args(argv)
        if args.op == "serve" or (served and args.op in STREAMING):
            raise AgentError(f"{args.op} cannot be asked of a serving agent")
        grid = Grid(args.root)
        result = OPERATIONS[args.op](grid, args)
    except AgentError as e:
        return {"ok": False, "error": e.kind, "message": shortened(str(e))}
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        message = f"{errno.errorcode.get(e.errno, 'error')} {e.strerror}{where}"
        return {"ok": False, "error": "OperationFailed", "message": shortened(message)}
    except Exception as e:  # a request nobody foresaw: an answer, and the agent serves on
        message = f"{args.op if args else 'request'} failed: {type(e).__name__}: {e}"
        return {"ok": False, "error": "OperationFailed", "message": shortened(message)}
    finally:
        if grid is not None:
            grid.end_ops()
    return None if args.op in STREAMING else {"ok": True, "result": result}


def serve(root):
    """Answer operations read from stdin until it closes (see the module's docstring)."""
    for line in sys.stdin.buffer:  # bytes: a line that is not UTF-8 is a bad request, not an end
        try:
            request = json.loads(line)
            if not isinstance(request, list) or not all(isinstance(a, str) for a in request):
                raise ValueError("a request is a JSON list of strings")
            reply = answer([root, *request], served=True)
        except (ValueError, RecursionError) as e:
            reply = {"ok": False, "error": "OperationFailed", "message": shortened(f"bad request: {e}")}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[1:2] == ["serve"]:
        return serve(argv[0])
    reply = answer(argv)
    if reply is not None:
        print(json.dumps(reply))
        return 0 if reply["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
