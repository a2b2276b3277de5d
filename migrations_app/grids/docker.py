"""
The docker driver: a grid is a Docker engine, reached through its socket on the grid host,
locally or over SSH (the docker CLI runs there: `docker -H unix://SOCKET ...`).

The agent, the same package a hostgrid runs, runs inside the engine (see
agent/containers.py): in the grid's own container, `mig.<grid>`, for everything about apps
and their components, and in an app's sidecar, `mig.<grid>.<app>`, for whatever reads or
writes the app's data. MIG reaches either with `docker exec -i`, through the grid's
transport, so an operation costs what it costs on a hostgrid: a round trip to a serving
agent. The agent is installed into the grid's volume on first use; `init` makes the grid's
container. No CLI output is parsed: MIG reads only the agent's answers and exit statuses.
"""

import posixpath
import shlex
import time
import uuid

from .agent.containers import IMAGE_HINT, SOCKET
from .driver import GridInfo, Image, RsyncSource
from .errors import GridError, InvalidName
from .gridinfo import IMAGE_RE
from .hostgrid import HostGridDriver, check_relpath
from .names import shorten, validate_name

FOLLOW_INTERVAL = 0.2


def check_image(ref):
    """An image reference, checked before any command is built from it."""
    if not isinstance(ref, str) or not IMAGE_RE.match(ref):
        raise InvalidName(f"invalid image reference {shorten(ref)}")
    return ref


class DockerDriver(HostGridDriver):
    def docker(self, *args):
        return ["docker", "-H", f"unix://{self.grid.docker_socket}", *args]

    @property
    def grid_container(self):
        return f"mig.{self.grid.name}"

    def sidecar(self, app):
        return f"mig.{self.grid.name}.{validate_name(app)}"

    def app_dir(self, app):
        return f"{self.grid.root}/apps/{validate_name(app)}"

    # --- reaching the agent ---------------------------------------------------------------

    def _argv(self, op, args, where=None):
        container = where or self.grid_container
        return self.docker(
            "exec", "-i", container, self.grid.python, self.agent_path, self.grid.root, op, *args
        )

    def _put_grid_file(self, data, path, mode):
        """Write one of MIG's own files (paths MIG makes, never an operator's) into the
        grid's volume, through its container."""
        q = shlex.quote
        directory = posixpath.dirname(path)
        tmp = f"{directory}/.{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp"
        script = (
            f"umask 077 && mkdir -p -- {q(directory)} && cat > {q(tmp)} && chmod {mode:o} {q(tmp)} "
            f"&& mv -f -- {q(tmp)} {q(path)} || {{ rm -f -- {q(tmp)}; exit 1; }}"
        )
        result = self.transport.run(
            self.docker("exec", "-i", self.grid_container, "sh", "-c", script), input=data, check=False
        )
        if result.returncode != 0:
            self._raise_for(result.err, None)

    def _recover(self, status, err, where, tried):
        """A sidecar that is missing or stopped is made or started (by the grid's agent),
        once; a grid container that is stopped is started, once."""
        gone = "No such container" in err
        if not gone and "is not running" not in err:
            return super()._recover(status, err, where, tried)
        if where is None:
            if gone or "start" in tried:
                self._raise_for(err, None)
            tried.add("start")
            self.transport.run(self.docker("start", self.grid_container))
            return True
        if "sidecar" in tried:
            return False
        tried.add("sidecar")
        self._call("sidecar", where.rsplit(".", 1)[1])
        return True

    def _raise_for(self, err, app):
        if "No such container" in err and app is None:
            raise GridError(
                f"grid {self.grid.name!r} is not initialised on its engine: "
                f"run manage.py grids --init {self.grid.name}"
            )
        detail = "; ".join(err.strip().splitlines()[-3:]) or "no output"
        raise GridError(f"grid {self.grid.name!r}: {detail}")

    def _sidecar_popen(self, app, op, *args):
        sidecar = self.sidecar(app)
        self._call("sidecar", app)  # made or started if it is not running: a stream cannot retry
        return self.transport.popen(self._argv(op, [app, *args], sidecar))

    # --- the grid ---------------------------------------------------------------------------

    def info(self):
        try:
            return super().info()
        except GridError as e:
            if "is not initialised on its engine" not in str(e):
                raise
        return GridInfo(
            name=None,
            app_url=None,
            initialised=False,
            writable=False,
            free_bytes=None,
            total_bytes=None,
            apps=0,
            python="",
            rsync=False,
            time=time.time(),
        )

    def init(self):
        """Make the grid's container (and its volume) on the engine, then the grid."""
        validate_name(self.grid.name, "grid")
        made = self._ensure_grid_container()
        return super().init() or made

    def _init_args(self):
        return [
            *super()._init_args(),
            *("--runtime", "docker", "--image", self.grid.image, "--docker-socket", self.grid.docker_socket),
        ]

    def _ensure_grid_container(self):
        name = self.grid_container
        started = self.transport.run(self.docker("start", name), check=False)
        if started.returncode == 0:
            return False
        if "No such container" not in started.err:
            self._raise_for(started.err, None)
        labels = ["--label", f"mig.grid={self.grid.name}", "--label", "mig.role=grid"]
        self.transport.run(self.docker("volume", "create", *labels, name))
        made = self.transport.run(
            self.docker(
                "run", "--detach", "--pull", "never", "--name", name, *labels,
                "--init", "--network", "host", "--restart", "unless-stopped",
                "--volume", f"{name}:{self.grid.root}",
                "--volume", f"{self.grid.docker_socket}:{SOCKET}",
                self.grid.image, "sleep", "infinity",
            ),
            check=False,
        )  # fmt: skip
        if made.returncode != 0:
            if "No such image" in made.err:
                raise GridError(
                    f"grid {self.grid.name!r}: the image {self.grid.image!r} is not on its engine: "
                    f"{IMAGE_HINT}"
                )
            self._raise_for(made.err, None)
        return True

    # --- images -----------------------------------------------------------------------------

    def images(self, refs):
        for ref in refs:
            check_image(ref)
        found = self._call("images", *refs)
        return {ref: Image(ref, value["id"], value["size"]) for ref, value in found.items()}

    def open_image_export(self, ref):
        return self.transport.popen(self.docker("save", check_image(ref)))

    def open_image_import(self):
        return self.transport.popen(self.docker("load", "--quiet"))

    # --- files inside an app ----------------------------------------------------------------

    def put_file(self, app, path, data, mode=0o600):
        args = [validate_name(app), check_relpath(path), "--mode", str(int(mode))]
        self._put(args, data, where=self.sidecar(app))

    def read_file(self, app, path, offset=0):
        data = self._call(
            "read",
            validate_name(app),
            check_relpath(path),
            "--offset",
            str(int(offset)),
            where=self.sidecar(app),
        )
        return data["data"], data["offset"]

    def follow(self, app, path, offset=0, max_time=86400):
        """Yield the lines of an app's file as they are written, until the app stops: the
        sidecar reads, the grid's agent knows whether the app runs."""
        self.state(app)  # fails early if the app is gone
        pending = ""
        deadline = time.monotonic() + max_time
        while time.monotonic() < deadline:
            text, offset = self.read_file(app, path, offset)
            if text:
                pending += text
                *lines, pending = pending.split("\n")
                yield from lines
                continue
            if self.state(app).value not in ("running", "starting"):
                return
            time.sleep(FOLLOW_INTERVAL)

    # --- the final pass ---------------------------------------------------------------------

    def rsync_source(self, app):
        sidecar = self.sidecar(app)
        self._call("sidecar", app)
        return RsyncSource(
            f"{sidecar}:{self.app_dir(app)}/volumes/",
            # rsync appends the sidecar's name, then its server's command line.
            self.transport.remote_shell(self.docker("exec", "-i")),
        )

    def open_scan(self, app, hashes=False, wait=False, survey=False):
        flags = {"--hashes": hashes, "--wait": wait, "--survey": survey}
        return self._sidecar_popen(app, "scan", *(flag for flag, wanted in flags.items() if wanted))

    def open_delta(self, app):
        return self._sidecar_popen(app, "delta")
