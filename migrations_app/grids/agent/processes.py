"""
Components as processes on the grid host: the hostgrid runtime.

A component runs as a detached process in a session of its own, with a pid file
(`run/<component>.pid`: "<pid> <start time>") and a log (`logs/<component>.log`); its
volumes are directories under the app's. A component with `restarts` runs under a
supervisor (the agent's `supervise`), which starts it again when it dies.

A Python component whose manifest names modules to `preload` can be prepared ahead of its
start (prepare()): its interpreter starts, imports those modules and waits, running nothing
of the app, until start() tells it to go through a fifo (`run/<component>.go`) or its
deadline passes. `run/<component>.warm` says which process waits, until when, and for which
command, directory and environment: a start with any other runs the component afresh.
Meanwhile it compiles the app's Python files under the script's directory (compiling runs
nothing) and keeps the code with the source it came from: an import whose file still holds
that source takes it, one the copy changed since is compiled then, as ever.
"""

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

from .base import AgentError, agent_argv, ensure_dir, log_line, say
from .procs import have_proc, pid_alive, proc_stat, session_members, session_of, signal_all

# What a component inherits from the agent's environment, beside what the grid tells it.
PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ")
RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)
# A prepared process is taken only with this long left before its deadline: it must not
# leave by the deadline between being told to go and reading it.
WARM_MARGIN = 5.0
# How long a prepared process may take to import what it preloads and say it is ready.
WARM_READY_WAIT = 60.0
PYTHON_RE = re.compile(r"^python[0-9.]*\Z")

# How much of the app's code a prepared process compiles ahead: the script's directory may
# hold the app's data too.
COMPILE_AHEAD_ENTRIES = 20_000
COMPILE_AHEAD_BYTES = 32 << 20

# What a prepared process runs, in the component's own interpreter (MIG's code is not
# there): preload, refuse a module of the app's own files (the copy may still change
# them), say ready, compile the app's Python files ahead while it waits for "go" on the
# fifo or the deadline, then run the component's script or module as `python SCRIPT ARGS` /
# `python -m MODULE ARGS` would.
WARM_STUB = r"""
import importlib, importlib.machinery, importlib.util, os, select, stat, sys, time
go, ready, deadline, app_dir, entries, size, preload = sys.argv[1:8]
go, ready, deadline, argv = int(go), int(ready), float(deadline), sys.argv[8:]
inside = os.path.realpath(app_dir) + os.sep
def report(line):
    os.write(ready, line.encode() + b"\n")
    os.close(ready)
    if line != "ready":
        sys.exit(1)
def of_the_app(name):
    return f"{name} is one of the app's own files, which the copy may still change"
for name in preload.split(","):
    try:
        parts = name.split(".")
        for prefix in (".".join(parts[: i + 1]) for i in range(len(parts))):
            # Found before it is imported: a module of the app's is never run.
            spec = importlib.util.find_spec(prefix)
            if spec is None:
                report(f"cannot preload {name}: there is no module {prefix}")
            where = [spec.origin or "", *(spec.submodule_search_locations or [])]
            if any(p and os.path.realpath(p).startswith(inside) for p in where):
                report(f"cannot preload {name}: {of_the_app(prefix)}")
        importlib.import_module(name)
    except Exception as e:
        report(f"cannot preload {name}: {type(e).__name__}: {e}")
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and os.path.realpath(path).startswith(inside):
        report(f"preloading imported {of_the_app(module.__name__)}")
report("ready")
def told_to_go(wait):  # within `wait` seconds; it leaves at its deadline
    if (left := deadline - time.time()) <= 0:
        sys.exit(0)
    return bool(select.select([go], [], [], min(wait, left))[0]) and os.read(go, 16).startswith(b"go")
# While it waits, the app's code compiled ahead (it runs nothing), a file at a time, until
# the go: {path: (source, code)}. After the ready, which then comes sooner.
ahead, gone = {}, False
code_dir = os.getcwd() if argv[0] == "-m" else os.path.dirname(os.path.abspath(argv[0]))
entries, size = int(entries), int(size)
for top, dirs, files in os.walk(code_dir) if os.path.realpath(code_dir).startswith(inside) else ():
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    if (entries := entries - len(dirs) - len(files)) < 0 or size < 0 or (gone := told_to_go(0)):
        break
    for name in (n for n in files if n.endswith(".py")):
        if gone := told_to_go(0):
            break
        path = os.path.join(top, name)
        try:
            # Not blocking, and files only: a fifo named *.py must not hold the start up.
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                source = f.read(size + 1) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else b""
            if source and (size := size - len(source)) >= 0:
                ahead[path] = source, compile(source, path, "exec", dont_inherit=True)
        except Exception:
            pass  # its import says what is wrong with it, as it would have
    if gone:
        break
class CompiledAhead(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):
        # Used once (let go of), and only while the file holds what was compiled: the copy
        # may have changed it since.
        source, code = ahead.pop(self.path, (None, None))
        return code if code and self.get_data(self.path) == source else super().get_code(fullname)
class FindCompiledAhead:
    @staticmethod
    def find_spec(name, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec and type(spec.loader) is importlib.machinery.SourceFileLoader and spec.origin in ahead:
            spec.loader = CompiledAhead(spec.loader.name, spec.loader.path)
        return spec
print(f"compiled {len(ahead)} Python file(s) of the app ahead{', then told to go' * gone}", flush=True)
if ahead:
    sys.meta_path.insert(sys.meta_path.index(importlib.machinery.PathFinder), FindCompiledAhead)
while not gone:
    gone = told_to_go(3600)
os.close(go)
import runpy
if argv[0] == "-m":
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
    runpy.run_path(argv[0], run_name="__main__")
"""

# The prepared processes this agent started, by pid: it reaps them (and learns their exit
# status) when they end, as it does the components it starts.
WARM_CHILDREN = {}


class Processes:
    name = "processes"

    def __init__(self, grid):
        self.grid = grid

    # --- apps ---------------------------------------------------------------------------

    def create(self, app, manifest, template_dir=None):
        """The app's volumes, as directories in its own; with `template_dir`, filled from
        the template's."""
        for volume in manifest["volumes"]:
            path = ensure_dir(os.path.join(self.grid.app_dir(app), "volumes", volume))
            source = os.path.join(template_dir, "volumes", volume) if template_dir else None
            if source and os.path.isdir(source):
                shutil.copytree(source, path, symlinks=True, dirs_exist_ok=True)

    def pin(self, manifest):
        """The manifest an app is made from, as this runtime will run it."""
        return manifest

    def remove(self, app):
        """What the app has beyond its directory (nothing: its volumes are in it)."""
        return []

    # --- components ---------------------------------------------------------------------

    def pidfile(self, app, component):
        return os.path.join(self.grid.app_dir(app), "run", f"{component}.pid")

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

    def start(self, app, manifest, component, command, cwd, env):
        """Start one component; returns its process (poll(), returncode). A process
        prepared for this very command, directory and environment is told to go instead."""
        name = component["name"]
        env = full_env(env)
        digest = launch_digest(command, cwd, env, component.get("preload", []))
        if (prepared := self.take_warm(app, name, digest)) is not None:
            with open(self.log_path(app, name), "ab") as log:
                log.write(log_line(f"starting {name} (its prepared process, pid {prepared.pid})").encode())
            self.write_pidfile(app, name, prepared.pid)
            return prepared
        if component.get("restarts"):
            # A supervisor runs it, and runs it again if it dies (see supervise()).
            command = agent_argv(self.grid.root, "supervise", app, name)
        try:
            proc = self.spawn(app, name, command, cwd, env, f"starting {name}")
        except OSError as e:
            raise AgentError(f"component {name!r} cannot start {command[0]!r}: {e.strerror}") from None
        self.write_pidfile(app, name, proc.pid)
        return proc

    def spawn(self, app, name, argv, cwd, env, saying, pass_fds=()):
        """Run a component's process, its output in the component's log after a line
        `saying` what it is. Its own session: it outlives this agent and the SSH
        connection, and a stop finds everything it spawned. Raises OSError."""
        with open(self.log_path(app, name), "ab") as log:
            log.write(log_line(saying).encode())
            log.flush()
            return subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=pass_fds,
            )

    def write_pidfile(self, app, name, pid):
        with open(self.pidfile(app, name), "w") as f:
            f.write(f"{pid} {start_time_of(pid)}\n")

    def log_path(self, app, name):
        return os.path.join(self.grid.app_dir(app), "logs", f"{name}.log")

    # --- prepared starts ----------------------------------------------------------------

    def warm_paths(self, app, name):
        run = os.path.join(self.grid.app_dir(app), "run")
        return os.path.join(run, f"{name}.warm"), os.path.join(run, f"{name}.go")

    def prepare(self, app, manifest, component, command, cwd, env, wait):
        """Start the component's interpreter ahead of its start, its `preload` modules
        imported, running nothing of the app until start() or `wait` seconds pass. Returns
        None once it is ready, or why the component will start cold."""
        name = component["name"]
        preload = component.get("preload", [])
        if component.get("restarts"):
            return "it runs under a supervisor, which starts it afresh"
        if not preload:
            return "its manifest names no modules to preload"
        script = command[1:2] and command[1]
        if (
            not PYTHON_RE.match(os.path.basename(command[0]))
            or not script
            or (script.startswith("-") and (script != "-m" or len(command) < 3))
        ):
            return "it is not a Python script or module (python SCRIPT, python -m MODULE)"
        self.end_warm(app, name)
        env = full_env(env)
        warm_file, fifo = self.warm_paths(app, name)
        os.mkfifo(fifo, 0o600)
        # Read and write, so that the fifo never reads as ended while it waits.
        go = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        ready_r, ready_w = os.pipe()
        deadline = time.time() + wait
        argv = [command[0], "-c", WARM_STUB, str(go), str(ready_w), repr(deadline), self.grid.app_dir(app)]
        argv += [str(COMPILE_AHEAD_ENTRIES), str(COMPILE_AHEAD_BYTES), ",".join(preload), *command[1:]]
        try:
            proc = self.spawn(app, name, argv, cwd, env, f"preparing the start of {name}", (go, ready_w))
        except OSError as e:
            os.close(ready_r)
            os.unlink(fifo)
            return f"its interpreter cannot start: {e.strerror}"
        finally:
            for fd in (go, ready_w):
                os.close(fd)
        WARM_CHILDREN[proc.pid] = proc
        # Recorded at once, so that a stop finds it even before it is ready.
        digest = launch_digest(command, cwd, env, preload)
        with open(warm_file, "w") as f:
            f.write(f"{proc.pid} {start_time_of(proc.pid)} {deadline!r} {digest}\n")
        with os.fdopen(ready_r, "rb") as ready:
            said = ready.readline().decode("utf-8", "replace").strip() if wait_readable(ready) else ""
        if said != "ready":
            self.end_warm(app, name)
            tail = self.log_tail(app, name, 2) or "no output"
            return said or f"its prepared process did not get ready: {tail}"
        return None

    def take_warm(self, app, name, digest):
        """The component's prepared process, told to go, if there is one for `digest` with
        time left; None otherwise (a prepared process of another launch ends here)."""
        warm_file, fifo = self.warm_paths(app, name)
        try:
            with open(warm_file) as f:
                pid, start_time, deadline, prepared_for = f.read().split()
            pid, deadline = int(pid), float(deadline)
        except (FileNotFoundError, ValueError):
            return None
        if prepared_for != digest or deadline - time.time() < WARM_MARGIN or not pid_alive(pid, start_time):
            self.end_warm(app, name)
            return None
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: nothing reads it any more
        except OSError:
            self.end_warm(app, name)
            return None
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)
        for path in (warm_file, fifo):
            os.unlink(path)
        return PreparedProcess(pid, start_time)

    def end_warm(self, app, name):
        """End the component's prepared process, if it has one; it ran nothing of the app."""
        warm_file, fifo = self.warm_paths(app, name)
        try:
            with open(warm_file) as f:
                pid, start_time = f.read().split()[:2]
            if (proc := WARM_CHILDREN.get(int(pid))) is not None:
                forget_warm(proc)  # this agent's: killed and reaped, even if it had ended
            elif pid_alive(int(pid), start_time):
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass
        for path in (warm_file, fifo):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def stop(self, app, manifest, grace, force):
        """SIGTERM every component's session, wait, then SIGKILL only if forced. Returns
        the survivors, {component: [pids]}."""
        leaders = {}
        for c in manifest["components"]:
            self.end_warm(app, c["name"])
            pid = self.component_pid(app, c["name"])
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
                    os.unlink(self.pidfile(app, name))
                except FileNotFoundError:
                    pass
        return survivors

    def log_tail(self, app, component, lines=5):
        path = os.path.join(self.grid.app_dir(app), "logs", f"{component}.log")
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 4096))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


class PreparedProcess:
    """A prepared process told to go: the part of subprocess.Popen that op_start uses. The
    agent that prepared it is its parent and knows its status; another one knows only that
    it ended."""

    def __init__(self, pid, start_time):
        self.pid, self.start_time = pid, start_time
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            if (child := WARM_CHILDREN.get(self.pid)) is not None:
                self.returncode = child.poll()
            elif not pid_alive(self.pid, self.start_time):
                self.returncode = "unknown"
        return self.returncode


def start_time_of(pid):
    """What tells a process from a later one with its pid (see procs.pid_alive); 0 where
    there is no /proc."""
    info = proc_stat(pid) if have_proc() else None
    return info[2] if info else 0


def full_env(env):
    """A component's environment: what it inherits from the agent's, and what it is told."""
    env = {**{k: os.environ[k] for k in PASSED_ENV if k in os.environ}, **env}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def launch_digest(command, cwd, env, preload):
    launch = {"command": command, "cwd": cwd, "env": env, "preload": preload}
    return hashlib.sha256(json.dumps(launch, sort_keys=True).encode()).hexdigest()[:32]


def wait_readable(f, timeout=WARM_READY_WAIT):
    return bool(select.select([f], [], [], timeout)[0])


def forget_warm(proc):
    """Kill a prepared process of this agent's and reap it."""
    proc.kill()
    proc.wait()
    WARM_CHILDREN.pop(proc.pid, None)


def supervise(component, command, cwd):
    """Run one component, and start it again each time it dies, at most its `restarts` times.

    The supervisor is the component's session leader (its pid is the one in the pid file), so
    a stop signals both: then the supervisor restarts nothing, waits for the component and
    leaves with its status. A component that exits with status 0 is done, not dead.
    """
    component_name = component["name"]
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
            say(f"{component_name} exited with status {status}; restarted {restarts} time(s): giving up")
            sys.exit(status if 0 < status < 256 else 1)
        delay = RESTART_DELAYS[min(restarts, len(RESTART_DELAYS) - 1)]
        restarts += 1
        say(f"{component_name} exited with status {status}; restart {restarts} of {limit} in {delay:g}s")
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.05)
        if stopping:
            sys.exit(0)
