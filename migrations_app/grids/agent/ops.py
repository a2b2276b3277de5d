"""
The agent's operations, its command line and its serving loop (see the package's docstring).
"""

import argparse
import base64
import errno
import json
import os
import re
import shlex
import shutil
import sys
import tarfile
import time
import uuid
from urllib.parse import urlsplit

from . import tree
from .base import (
    IMAGE_RE,
    NAME_RE,
    AgentError,
    Exists,
    Invalid,
    NotFound,
    check_name,
    check_relpath,
    ensure_dir,
    read_json,
    say,
    shorten,
    write_json,
    write_private,
)
from .cutover import Cutover
from .grid import (
    DEFAULT_START_SETTLE,
    DEFAULT_STOP_GRACE,
    Grid,
    listening,
    validate_manifest,
)
from .processes import RESTART_DELAYS, PreparedProcess, Processes, supervise

WATCH_INTERVAL = 0.2
WATCHDOG_START_ATTEMPTS = 5
# How often `follow` looks for new lines, and whether the app still runs (seconds).
FOLLOW_POLL = 0.05
FOLLOW_STATE_EVERY = 0.5


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
    if args.runtime == "docker":
        if not args.image or not IMAGE_RE.match(args.image) or not os.path.isabs(args.docker_socket or ""):
            raise Invalid("a docker grid needs --image and --docker-socket (an absolute path)")
        wanted.update(runtime="docker", image=args.image, docker_socket=args.docker_socket)
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


def volume_sizes(grid, app, manifest):
    """{volume: (bytes, files)} of an app's volumes, counted here."""
    return {v: tree_size(os.path.join(grid.app_dir(app), "volumes", v)) for v in manifest["volumes"]}


def op_sizes(grid, args):
    return volume_sizes(grid, args.app, grid.manifest(args.app))


def op_describe(grid, args):
    manifest = grid.manifest(args.app)
    app_dir = grid.app_dir(args.app)
    sizes = {}
    if args.sizes:
        # Where the volumes are not directories here (a docker grid), the runtime counts.
        counted = getattr(grid.runtime, "sizes", None)
        sizes = counted(args.app, manifest) if counted else volume_sizes(grid, args.app, manifest)
    volumes = []
    for name in manifest["volumes"]:
        size, files = sizes.get(name, (None, None))
        path = os.path.join(app_dir, "volumes", name)
        volumes.append({"name": name, "path": path, "bytes": size, "files": files})
    components = [
        {"name": c["name"], "pid": grid.component_pid(args.app, c["name"]), "command": c["command"]}
        for c in manifest["components"]
    ]
    return {
        "name": args.app,
        "state": grid.state(args.app),
        "path": app_dir,
        "volumes_dir": os.path.join(app_dir, "volumes"),
        "url": grid.app_url(args.app, manifest),
        "manifest": manifest,
        "volumes": volumes,
        "components": components,
    }


def make_app(grid, app, manifest, template_dir=None):
    """Write an app's directories, then its manifest last: the manifest makes it exist. A
    grid that gives each app a port gives this one the lowest free one."""
    fd = grid.grid_lock()
    try:
        port = grid.assign_port(app) if not grid.exists(app) else None
        if port is not None:
            manifest = dict(manifest, port=port)
        write_app(grid, app, grid.runtime.pin(manifest), template_dir)
    finally:
        os.close(fd)


def write_app(grid, app, manifest, template_dir):
    if grid.exists(app):
        raise Exists(f"app {app!r} already exists on this grid")
    ensure_dir(grid.apps)
    app_dir = ensure_dir(grid.app_dir(app))
    for sub in ("run", "logs", "volumes"):
        ensure_dir(os.path.join(app_dir, sub))
    ensure_dir(os.path.join(app_dir, "secrets"), 0o700)
    os.chmod(os.path.join(app_dir, "secrets"), 0o700)
    grid.runtime.create(app, manifest, template_dir)
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
    manifest = dict(template, template=args.template, properties=props, owner=args.owner)
    manifest = validate_manifest(dict(manifest, reaches=args.reaches))

    make_app(grid, args.app, manifest, template_dir)
    return {"created": args.app}


def op_fill(grid, args):
    """In a docker grid's sidecar, where the app's volumes are directories: fill them from
    the app's template."""
    template_dir = os.path.join(grid.catalog, check_name(args.template, "template"))
    # The app is made from this template, and exists once filled: its volumes are these.
    template = validate_manifest(read_json(os.path.join(template_dir, "manifest.json")))
    Processes(grid).create(check_name(args.app), template, template_dir)
    return {"filled": args.app}


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


def component_launch(grid, app, manifest, component):
    """(command, cwd, env) of one component: its manifest's, placeholders expanded, and
    the grid's variables telling it where it runs."""
    config = grid.config()
    env = {"MIG_GRID": config.get("name", ""), "MIG_APP": app, "MIG_APP_URL": grid.app_url(app, manifest)}
    name = component["name"]
    for key, value in component.get("env", {}).items():
        env[key] = grid.expand(app, manifest, value, name)
    command = [grid.expand(app, manifest, a, name) for a in component["command"]]
    cwd = grid.expand(app, manifest, component.get("cwd", "{app_dir}"), name)
    return command, cwd, env


def start_component(grid, app, manifest, component):
    """Start one component as the grid's runtime runs them."""
    command, cwd, env = component_launch(grid, app, manifest, component)
    # What the component is told, for an operator who runs a command as it would
    # (`set -a; . run/NAME.env`): the grid's variables and the manifest's, no secrets.
    env_text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    write_private(os.path.join(grid.app_dir(app), "run", f"{component['name']}.env"), env_text.encode())
    return grid.runtime.start(app, manifest, component, command, cwd, env)


def op_prepare(grid, args):
    """Prepare the start of the app's stopped components (see the runtimes' prepare()):
    {"ready": [components], "cold": {component: why it will start afresh}}. Runs nothing
    of the app."""
    manifest = grid.manifest(args.app)
    fd = grid.lock(args.app)
    try:
        ready, cold = [], {}
        for component in manifest["components"]:
            name = component["name"]
            if grid.component_pid(args.app, name) is not None:
                cold[name] = "it runs already"
                continue
            command, cwd, env = component_launch(grid, args.app, manifest, component)
            why = grid.runtime.prepare(args.app, manifest, component, command, cwd, env, args.wait)
            if why is None:
                ready.append(name)
            else:
                cold[name] = why
        return {"ready": ready, "cold": cold}
    finally:
        os.close(fd)


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
            grid.runtime.stop(args.app, manifest, grace=2.0, force=True)
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
            grid.runtime.stop(args.app, manifest, grace=2.0, force=True)
            grid.set_state(args.app, "running")
            raise AgentError(
                f"component {name!r} exited at start with status {proc.returncode}: "
                f"{grid.runtime.log_tail(args.app, name) or 'no output'}"
            )
        grid.set_state(args.app, "running")
        warm = [n for n, p in started if isinstance(p, PreparedProcess)]
        return {"started": [n for n, _ in started], "listening": listens, "warm": warm}
    finally:
        os.close(fd)


def op_stop(grid, args):
    manifest = grid.manifest(args.app)
    fd = grid.lock(args.app)
    try:
        grid.set_state(args.app, "stopped", op="stopping")
        grace = args.grace
        if grace is None:
            grace = float(manifest.get("stop_grace", DEFAULT_STOP_GRACE))
        survivors = grid.runtime.stop(args.app, manifest, grace, args.force)
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
            survivors = grid.runtime.stop(args.app, grid.manifest(args.app), grace=5.0, force=True)
            if survivors:
                raise AgentError(f"app {args.app!r}: processes survived SIGKILL: {survivors}")
            # The app stops existing the moment its manifest goes, even if some data lingers.
            os.unlink(os.path.join(app_dir, "app.json"))
        finally:
            os.close(fd)
    leftovers = grid.runtime.remove(args.app)

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
        with tree.parent_dir(grid.app_dir(app), check_relpath(relpath)) as (dir_fd, name):
            return tree.open_regular(name, dir_fd)
    except OSError as e:
        if tree.not_there(e):
            raise FileNotFoundError(errno.ENOENT, "no such file", relpath) from None
        raise


def op_read(grid, args):
    grid.manifest(args.app)  # the app must exist
    try:
        with open_app_file(grid, args.app, args.path) as f:
            f.seek(args.offset)
            data = f.read(args.limit)
    except FileNotFoundError:
        return {"data": "", "offset": args.offset, "exists": False}
    return {"data": data.decode("utf-8", "replace"), "offset": args.offset + len(data), "exists": True}


def op_put(grid, args):
    """Write a file inside an app's directory (a volume's content, a secret) from stdin,
    atomically, every directory on the way a real one (made if missing): for grids whose
    app directories MIG's transport cannot write to itself (a docker grid's sidecar)."""
    rel = check_relpath(args.path)
    data = sys.stdin.buffer.read() if args.input is None else args.input
    *dirs, name = rel.split("/")
    fd = os.open(grid.app_dir(args.app), tree.DIRECTORY)
    try:
        for part in dirs:
            try:
                inner = os.open(part, tree.DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                inner = os.open(part, tree.DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        tmp = f".{name}.{uuid.uuid4().hex}.tmp"
        with tree.open_regular(tmp, fd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, args.mode) as f:
            f.write(data)
            os.fchmod(f.fileno(), args.mode)
        os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    return {"written": len(data)}


def op_images(grid, args):
    """{image reference: {"id", "size"}} of images on a docker grid's engine (id None: not
    there)."""
    runtime = grid.runtime
    if not hasattr(runtime, "images"):
        raise Invalid("only a docker grid has images")
    return runtime.images(args.ref or [])


def op_sidecar(grid, args):
    """A docker grid's app sidecar, running (made if missing)."""
    runtime = grid.runtime
    if not hasattr(runtime, "sidecar"):
        raise Invalid("only a docker grid's apps have sidecars")
    runtime.sidecar(args.app, grid.manifest(args.app))
    return {"sidecar": runtime.prefix(args.app)}


def op_follow(grid, args):
    """Print a file's lines as they are appended, until its app stops running."""
    offset = args.offset
    pending = b""
    deadline = time.monotonic() + args.max_time
    # A line is passed on soon (the helper waits for MIG's answer to some); whether the app
    # still runs, which reads its manifest and state, is asked less often.
    state_due = 0.0
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
        if time.monotonic() >= state_due:
            if not grid.exists(args.app) or safe_state(grid, args.app) not in ("running", "starting"):
                break
            state_due = time.monotonic() + FOLLOW_STATE_EVERY
        time.sleep(FOLLOW_POLL)
    return None


# --- supervised components ---------------------------------------------------------------


def op_supervise(grid, args):
    """Run a component with restarts, and run it again when it dies (see processes.py)."""
    manifest = grid.manifest(args.app)
    component = next((c for c in manifest["components"] if c["name"] == args.component), None)
    if component is None:
        raise NotFound(f"app {args.app!r} has no component {args.component!r}")
    command = [grid.expand(args.app, manifest, a, args.component) for a in component["command"]]
    cwd = grid.expand(args.app, manifest, component.get("cwd", "{app_dir}"), args.component)
    supervise(component, command, cwd)


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


# --- the final pass's listing and deltas (see tree.py) ------------------------------------


def volumes_dir(grid, app):
    grid.manifest(app)
    return os.path.join(grid.app_dir(app), "volumes")


def op_scan(grid, args):
    """Every entry of an app's volumes, one line each; --hashes adds block hashes.

    --wait: first wait for a line on stdin (and list nothing if it closes instead), so the
    listing can be set up before the app stops and begin the moment it has.
    --survey: a survey (see tree.py): after the listing, answer each sweep request read
    on stdin, until it closes.
    """
    base = volumes_dir(grid, args.app)
    if args.wait and not sys.stdin.readline():
        return
    if not args.survey:
        tree.scan(base, sys.stdout.write, hashes=args.hashes)
        sys.stdout.flush()
        return
    survey = tree.Survey(base)
    survey.scan(sys.stdout.write)
    sys.stdout.write(tree.LISTED.decode() + "\n")
    sys.stdout.flush()
    write_now = tree.flushing(sys.stdout)
    while line := sys.stdin.readline():
        request = json.loads(line)
        again = request.get("sweep")
        if not isinstance(again, list) or not all(isinstance(rel, str) for rel in again):
            raise Invalid(f"not a sweep request: {line[:200]!r}")
        survey.sweep(set(again), write_now, last=request.get("last") is True)
        sys.stdout.write(tree.SWEPT.decode() + "\n")
        sys.stdout.flush()


def op_delta(grid, args):
    """The blocks of files that differ from what the other side has (see tree.py)."""
    base = volumes_dir(grid, args.app)
    out = sys.stdout.buffer
    tree.widen_pipe(out)
    tree.send_deltas(base, sys.stdin.buffer, out, check_relpath)


# These write their own output and read their own input: a serving agent, whose input is
# requests and whose output is answers, cannot do them.
STREAMING = ("follow", "scan", "delta", "supervise", "watchdog")
# These read what they write from stdin; a serving agent takes it in the request instead.
READS_INPUT = ("put",)
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
    "prepare": op_prepare,
    "stop": op_stop,
    "destroy": op_destroy,
    "install-template": op_install_template,
    "template-version": op_template_version,
    "read": op_read,
    "put": op_put,
    "sidecar": op_sidecar,
    "images": op_images,
    "sizes": op_sizes,
    "fill": op_fill,
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
    s.add_argument("--runtime", choices=("processes", "docker"), default="processes")
    s.add_argument("--image")
    s.add_argument("--docker-socket")
    sub.add_parser("list")
    sub.add_parser("state").add_argument("app")
    s = sub.add_parser("destroy")
    s.add_argument("app")
    s.add_argument("--owner")
    s = sub.add_parser("start")
    s.add_argument("app")
    s.add_argument("--listen", action="store_true")
    s.add_argument("--timeout", type=SECONDS, default=60.0)
    s = sub.add_parser("prepare")
    s.add_argument("app")
    s.add_argument("--wait", type=number(1.0, 86400.0), default=1800.0)
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
    s.add_argument("--reaches", default="")
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
    s = sub.add_parser("put")
    s.add_argument("app")
    s.add_argument("path")
    s.add_argument("--mode", type=number(0, 0o777, int), default=0o600)
    sub.add_parser("sidecar").add_argument("app")
    sub.add_parser("images").add_argument("ref", nargs="*")
    sub.add_parser("sizes").add_argument("app")
    s = sub.add_parser("fill")
    s.add_argument("app")
    s.add_argument("--template", required=True)
    s = sub.add_parser("follow")
    s.add_argument("app")
    s.add_argument("path")
    s.add_argument("--offset", type=OFFSET, default=0)
    s.add_argument("--max-time", type=SECONDS, default=86400.0)
    s = sub.add_parser("scan")
    s.add_argument("app")
    s.add_argument("--hashes", action="store_true")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--survey", action="store_true")
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


def answer(argv, served=False, input=None):
    """Do one operation; its JSON answer, or None once a streaming one has written its own.
    `input`: what a served request carries for an operation that reads its input."""
    grid = args = None
    try:
        args = parser().parse_args(argv)
        if args.op == "serve" or (served and args.op in STREAMING):
            raise AgentError(f"{args.op} cannot be asked of a serving agent")
        if input is not None and args.op not in READS_INPUT:
            raise AgentError(f"{args.op} takes no input")
        if served and args.op in READS_INPUT and input is None:
            raise AgentError(f"{args.op} asked of a serving agent needs its input in the request")
        args.input = input
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


def served_request(request):
    """(argv, input or None) of a served request (see the package's docstring)."""
    input = None
    if isinstance(request, dict) and set(request) == {"argv", "input"} and isinstance(request["input"], str):
        request, input = request["argv"], base64.b64decode(request["input"], validate=True)
    if not isinstance(request, list) or not all(isinstance(a, str) for a in request):
        raise ValueError('a request is a JSON list of strings, or {"argv": that list, "input": base64}')
    return request, input


def serve(root):
    """Answer operations read from stdin until it closes (see the module's docstring)."""
    for line in sys.stdin.buffer:  # bytes: a line that is not UTF-8 is a bad request, not an end
        try:
            request, input = served_request(json.loads(line))
            reply = answer([root, *request], served=True, input=input)
        except (ValueError, RecursionError) as e:  # binascii.Error (bad base64) is a ValueError
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
