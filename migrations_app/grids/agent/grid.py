"""
A grid as the agent sees it: a directory (see the package's docstring), its apps' manifests,
states and placeholders.
"""

import errno
import fcntl
import functools
import os
import re
import socket
import sys
import time
from urllib.parse import urlsplit

from .base import (
    IMAGE_RE,
    NAME_RE,
    AgentError,
    Invalid,
    NotFound,
    check_name,
    ensure_dir,
    read_json,
    shorten,
    write_json,
)
from .processes import Processes
from .procs import have_proc, pid_alive, proc_stat

PLACEHOLDER_RE = re.compile(r"\{([a-z_]+)(?::([A-Za-z0-9_-]+))?\}")
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
MANIFEST_FORMAT = 1
DEFAULT_STOP_GRACE = 10.0
DEFAULT_START_SETTLE = 0.5
STATES = ("stopped", "starting", "running", "stopping", "failed", "unknown")


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
        return take_lock(os.path.join(self.root, ".mig", "grid.lock"), "the grid")

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
        return take_lock(os.path.join(self.app_dir(app), ".lock"), f"app {app!r}")

    # state

    @functools.cached_property
    def runtime(self):
        """What runs the grid's components: processes on this host, or containers."""
        if self.config().get("runtime") == "docker":
            from .containers import Containers

            return Containers(self)
        return Processes(self)

    def component_pid(self, app, component):
        return self.runtime.component_pid(app, component)

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


# What an operation under a lock may take (a start waiting for its app to listen, a stop's
# grace time and a forced stop's): a lock held longer is held by something stuck.
LOCK_WAIT = 150.0


def take_lock(path, what):
    """An exclusive lock on `path` (a descriptor to close), or, after LOCK_WAIT, an error
    naming the process that holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise AgentError(
                    f"{what} is busy: {lock_holder(path)} has held its lock for {LOCK_WAIT:g}s"
                ) from None
            time.sleep(0.02)


def lock_holder(path):
    """Which process holds the flock on `path`, as /proc/locks and its command line say."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()  # 1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
                    pid = fields[4]
                    with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                        command = cmd.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
                    return f"pid {pid} ({shorten(command, 200)})"
    except OSError:
        pass
    return "another process"


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
        # Docker grids: the component's image (the grid's by default), and whether it may
        # drive the engine (MIG's helper does). Other grids ignore them.
        image = c.get("image", "")
        if not isinstance(image, str) or not IMAGE_RE.match(image or "x"):
            raise AgentError(f"component {c['name']!r}: image must be an image reference")
        if not isinstance(c.get("engine", False), bool):
            raise AgentError(f"component {c['name']!r}: engine must be true or false")
        # Python modules a prepared start imports ahead (see processes.Processes.prepare).
        preload = c.get("preload", [])
        if (
            not isinstance(preload, list)
            or len(preload) > 100
            or not all(isinstance(m, str) and MODULE_RE.match(m) for m in preload)
        ):
            raise AgentError(f"component {c['name']!r}: preload must be a list of Python module names")
    props = manifest.get("properties", {})
    if not isinstance(props, dict) or not all(v is None or isinstance(v, str) for v in props.values()):
        raise AgentError("manifest properties must be an object of strings (or null: required)")
    template = manifest.get("template", "")
    if not isinstance(template, str) or len(template) > 64:
        raise AgentError("manifest template must be a name")
    owner = manifest.get("owner", "")
    if not isinstance(owner, str) or len(owner) > 200:
        raise AgentError("manifest owner must be a string of at most 200 characters")
    # The app whose volumes this one's components reach (MIG's helper: its target's).
    reaches = manifest.get("reaches", "")
    if reaches:
        check_name(reaches)
    clean = {
        "format": MANIFEST_FORMAT,
        "template": template,
        "properties": props,
        "volumes": volumes,
        "components": components,
        "owner": owner,
        "reaches": reaches,
    }
    for key in ("start_settle", "stop_grace"):
        if key in manifest:
            value = manifest[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
                raise AgentError(f"manifest {key} must be a number of seconds from 0 to 3600")
            clean[key] = value
    return clean


# --- operations --------------------------------------------------------------------------


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
