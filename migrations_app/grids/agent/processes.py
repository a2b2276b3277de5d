"""
Components as processes on the grid host: the hostgrid runtime.

A component runs as a detached process in a session of its own, with a pid file
(`run/<component>.pid`: "<pid> <start time>") and a log (`logs/<component>.log`); its
volumes are directories under the app's. A component with `restarts` runs under a
supervisor (the agent's `supervise`), which starts it again when it dies.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

from .base import AgentError, agent_argv, ensure_dir, say
from .procs import have_proc, pid_alive, proc_stat, session_members, session_of, signal_all

# What a component inherits from the agent's environment, beside what the grid tells it.
PASSED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ")
RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)


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
        """Start one component; returns its process (poll(), returncode)."""
        name = component["name"]
        env = {**{k: os.environ[k] for k in PASSED_ENV if k in os.environ}, **env}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        if component.get("restarts"):
            # A supervisor runs it, and runs it again if it dies (see supervise()).
            command = agent_argv(self.grid.root, "supervise", app, name)
        log_path = os.path.join(self.grid.app_dir(app), "logs", f"{name}.log")
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
        with open(self.pidfile(app, name), "w") as f:
            f.write(f"{proc.pid} {info[2] if info else 0}\n")
        return proc

    def stop(self, app, manifest, grace, force):
        """SIGTERM every component's session, wait, then SIGKILL only if forced. Returns
        the survivors, {component: [pids]}."""
        leaders = {}
        for c in manifest["components"]:
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
