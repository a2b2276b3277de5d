"""
The hostgrid driver: a grid is a directory on a POSIX host with Python.

Operations are answered by the agent (the `agent` package) on the grid host. One serving
agent, started on first use, answers every operation of a driver over one connection: an
operation then costs a round trip, not an SSH session, a login shell and an interpreter
(about 0.1 s each on the hosts we measured). Streaming operations (follow, scan, delta)
run an agent of their own. The agent is installed on first use, as one file (a zip archive
of its package, which Python runs), at <root>/.mig/agent-<version>.pyz, so a host needs no
set-up beyond Python, and an upgraded MIG never talks to an old agent.
"""

import base64
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import marshal
import shlex
import subprocess
import tarfile
import threading
import uuid
import zipfile
import zlib
from pathlib import Path

from .agent import base as agent_base
from .driver import App, AppState, Component, Cutover, Driver, GridInfo, Prepared, RsyncSource, Volume
from .errors import AppExists, AppNotFound, CommandTimeout, GridError, InvalidName, OperationFailed
from .gridinfo import GridConfig
from .names import validate_name


@functools.cache
def agent_archive() -> bytes:
    """The agent as one file: a zip archive of its package, which Python runs as a program.

    Each module's bytecode is beside its source, compiled by this Python and checked
    against that source (PEP 552): an agent then starts without compiling its 2,600 lines
    (25 ms of the 90 a start took on the hosts we measured). A grid whose Python is of
    another version compiles the source, as the bytecode's magic number tells it. Built the
    same way every time, so that its version names its content; built once per process, on
    first use (compiling takes 30 ms)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:

        def add(name, data):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)

        add("__main__.py", b"import sys\n\nfrom agent.ops import main\n\nsys.exit(main())\n")
        for path in sorted(Path(__file__).with_name("agent").glob("*.py")):
            source = path.read_bytes()
            add(f"agent/{path.name}", source)
            add(f"agent/{path.stem}.pyc", checked_bytecode(source, f"agent/{path.name}"))
    return buf.getvalue()


def checked_bytecode(source: bytes, filename: str) -> bytes:
    """A .pyc of `source` that is used only while it matches the source beside it."""
    code = compile(source, filename, "exec", dont_inherit=True)
    flags = 0b11  # hash-based, checked
    header = importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little") + importlib.util.source_hash(source)
    return header + marshal.dumps(code)


@functools.cache
def agent_version() -> str:
    return hashlib.sha256(agent_archive()).hexdigest()[:16]


# A file up to this size travels in a serving agent's request line (base64, held in memory).
SERVED_INPUT_LIMIT = 1 << 20
GATE_SOURCE = Path(__file__).with_name("gate.py").read_bytes()
# Runs the gate's source from the authorized_keys line itself: the host needs no file of MIG's.
GATE_LOADER = "import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.argv[1])))"
CUTOVER_FIELDS = {f.name for f in dataclasses.fields(Cutover)}
ERRORS = {
    "AppNotFound": AppNotFound,
    "AppExists": AppExists,
    "InvalidName": InvalidName,
    "OperationFailed": OperationFailed,
}


def check_relpath(path):
    """The agent's check, before any command is built: raises InvalidName."""
    try:
        return agent_base.check_relpath(path)
    except agent_base.Invalid as e:
        raise InvalidName(str(e)) from None


def authorized_keys_line(grid: GridConfig, public_key: str) -> str:
    """The authorized_keys line that lets MIG's key (`public_key`, "TYPE BASE64 [COMMENT]")
    do only MIG's work on `grid`, which then says `restricted = true` (see gate.py)."""
    packed = base64.b64encode(zlib.compress(GATE_SOURCE, 9)).decode()
    command = shlex.join([grid.python, "-c", GATE_LOADER, packed, grid.python, grid.root])
    quoted = command.replace("\\", "\\\\").replace('"', '\\"')
    return f'restrict,command="{quoted}" {public_key}'


class AgentSession:
    """A serving agent: one request line in, one answer line out, one at a time."""

    def __init__(self, proc):
        self.proc = proc
        self.lock = threading.Lock()
        self.timed_out = False

    def ask(self, request, timeout):
        """The answer line, or b"" if the agent ended (see end()). Kills it after `timeout`."""
        with self.lock:
            timer = threading.Timer(timeout, self._expire)
            timer.start()
            try:
                self.proc.stdin.write(json.dumps(request).encode() + b"\n")
                self.proc.stdin.flush()
                return self.proc.stdout.readline()
            except (OSError, ValueError):  # the agent or its connection ended
                return b""
            finally:
                timer.cancel()

    def _expire(self):
        self.timed_out = True
        self.proc.kill()

    def end(self):
        """Close the agent's input and return (exit status, its error output)."""
        quietly(self.proc.stdin.close)
        try:
            status = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        try:
            err = self.proc.stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):  # the connection went
            err = ""
        for stream in (self.proc.stdout, self.proc.stderr):
            quietly(stream.close)
        return status, err


def quietly(close):
    """Close a stream whose other end may be gone (a dropped connection): now, here, and not
    later, when the garbage collector's try would print a traceback to stderr."""
    try:
        close()
    except (OSError, ValueError):
        pass


class HostGridDriver(Driver):
    def __init__(self, grid, transport):
        super().__init__(grid, transport)
        # Serving agents, by where they run (here, one: the grid host's).
        self._sessions = {}

    @property
    def agent_path(self):
        return f"{self.grid.root}/.mig/agent-{agent_version()}.pyz"

    def _argv(self, op, args, where=None):
        """The command that runs an agent operation (`where` names where it runs, on grids
        whose operations run in more than one place)."""
        return [self.grid.python, self.agent_path, self.grid.root, op, *args]

    def _install_agent(self):
        self._put_grid_file(agent_archive(), self.agent_path, 0o644)

    def _put_grid_file(self, data, path, mode):
        """Write one of MIG's own files (the agent, a template's archive) into the grid."""
        self.transport.put(data, path, mode=mode)

    def _call(self, op, *args, timeout=None, where=None, input=None):
        request = (
            [op, *args] if input is None else {"argv": [op, *args], "input": base64.b64encode(input).decode()}
        )
        return self._answer(op, self._ask(request, timeout or self.grid.command_timeout, where))

    def _put(self, args, data, where=None):
        """The agent's `put` of `data`: a small file by the serving agent (no interpreter to
        start), a large one by an agent of its own, which reads it as it comes."""
        if len(data) <= SERVED_INPUT_LIMIT:
            return self._call("put", *args, input=data, where=where)
        return self._run_once("put", args, input=data, where=where)

    def _answer(self, op, line):
        """The result of an agent's answer line; its error, raised."""
        try:
            reply = json.loads(line)
        except ValueError:
            raise GridError(f"grid {self.grid.name!r}: {op}: unexpected answer {line[:200]!r}") from None
        if not reply["ok"]:
            raise ERRORS.get(reply["error"], OperationFailed)(f"grid {self.grid.name!r}: {reply['message']}")
        return reply["result"]

    def _run_once(self, op, args, input=b"", where=None):
        """An operation that reads its own input (`input`), by an agent of its own."""
        tried = set()
        while True:
            result = self.transport.run(self._argv(op, args, where), input=input, check=False)
            if answer := result.out.strip().splitlines()[-1:]:
                return self._answer(op, answer[0])
            if error := self.transport.failure(result.returncode, result.stderr):
                raise error
            if not self._recover(result.returncode, result.err, where, tried):
                detail = result.err.strip().splitlines()[-3:] or ["no output"]
                raise GridError(
                    f"grid {self.grid.name!r}: {op} failed (status {result.returncode}): " + "; ".join(detail)
                )

    def _ask(self, request, timeout, where=None):
        """Send one request to the serving agent, starting (and installing) it if needed."""
        tried = set()
        while True:
            session = self._sessions.get(where)
            if session is not None and session.proc.poll() is not None:
                self._end_session(where)  # it ended while idle (a dropped connection): start another
                session = None
            if session is None:
                proc = self.transport.popen(self._argv("serve", [], where))
                session = self._sessions[where] = AgentSession(proc)
            try:
                line = session.ask(request, timeout)
            except BaseException:
                # Interrupted half-way (Ctrl-C, a signal): its answer would be taken for
                # the next request's. This agent is done.
                self._end_session(where)
                raise
            if line:
                return line
            status, err = self._end_session(where)
            if session.timed_out:
                raise CommandTimeout(f"grid {self.grid.name!r}: {request[0]} did not finish in {timeout:g}s")
            if error := self.transport.failure(status, err.encode()):
                raise error
            if self._recover(status, err, where, tried):
                continue
            detail = err.strip().splitlines()[-3:] or ["no output"]
            raise GridError(
                f"grid {self.grid.name!r}: {request[0]} failed (status {status}): " + "; ".join(detail)
            )

    def _recover(self, status, err, where, tried):
        """Whether what made an agent end at once can be put right (and was): then the
        request is asked again. Here: an agent not installed yet is installed, once."""
        if status == 2 and "can't open file" in err and "install" not in tried:
            tried.add("install")
            self._install_agent()
            return True
        return False

    def _end_session(self, where=None):
        session = self._sessions.pop(where, None)
        return session.end() if session else (None, "")

    def close(self):
        for where in list(self._sessions):
            self._end_session(where)
        super().close()

    # --- the grid ---

    def info(self):
        return GridInfo(**self._call("info"))

    def init(self):
        """Create the grid's layout and record its name; idempotent."""
        validate_name(self.grid.name, "grid")
        return self._call("init", *self._init_args())["changed"]

    def _init_args(self):
        args = ["--name", self.grid.name, "--app-url", self.grid.app_url]
        if self.grid.app_ports:
            low, high = self.grid.app_ports
            args += ["--app-ports", f"{low}-{high}"]
        return args

    # --- apps ---

    def list_apps(self):
        return [App(a["name"], AppState(a["state"])) for a in self._call("list")]

    def state(self, app):
        return AppState(self._call("state", validate_name(app)))

    def describe(self, app, sizes=True):
        args = [validate_name(app)] + (["--sizes"] if sizes else [])
        data = self._call("describe", *args)
        return App(
            name=data["name"],
            state=AppState(data["state"]),
            path=data["path"],
            volumes_dir=data["volumes_dir"],
            url=data.get("url", ""),
            manifest=data["manifest"],
            volumes=[Volume(**v) for v in data["volumes"]],
            components=[Component(**c) for c in data["components"]],
        )

    def provision(self, app, template, properties=None, secrets=None, start=True, owner="", reaches=""):
        """Create an app from a catalog template, give it its secrets, then start it.

        Secrets are files written with mode 0600 under the app's secrets/ directory:
        they never appear in a command line, an environment string or a manifest.
        """
        validate_name(app)
        validate_name(template, "template")
        args = [app, "--template", template, "--owner", owner]
        if reaches:
            args += ["--reaches", validate_name(reaches)]
        for key, value in (properties or {}).items():
            validate_name(key, "property")
            args += ["--property", f"{key}={value}"]
        self._call("create", *args)
        try:
            for name, data in (secrets or {}).items():
                self.put_secret(app, name, data)
            if start:
                self.start(app)
        except BaseException:
            self.destroy(app, owner=owner)
            raise

    def put_secret(self, app, name, data):
        self.put_file(app, f"secrets/{validate_name(name, 'secret')}", data, 0o600)

    def put_file(self, app, path, data, mode=0o600):
        """Write a file inside an app's directory (a volume's content, a secret): by the
        agent, which follows no symlink the app made on the way."""
        self._put([validate_name(app), check_relpath(path), "--mode", str(int(mode))], data)

    def start(self, app, listen=False, timeout=30.0):
        """Start the app's components: started once they have stayed up for the manifest's
        settle time, or, with `listen`, as soon as something listens where the grid
        publishes the app. The answer's "listening" is False if nothing did within
        `timeout` seconds."""
        args = [validate_name(app)]
        if listen:
            args += ["--listen", "--timeout", str(float(timeout))]
        return self._call("start", *args, timeout=timeout + 30 if listen else None)

    def prepare_start(self, app, wait=1800.0):
        result = self._call("prepare", validate_name(app), "--wait", str(float(wait)))
        return Prepared(tuple(result["ready"]), dict(result["cold"]))

    def stop(self, app, grace=None, force=False):
        args = [validate_name(app)]
        if grace is not None:
            args += ["--grace", str(float(grace))]
        if force:
            args.append("--force")
        return self._call("stop", *args)

    def destroy(self, app, owner=None):
        return self._call("destroy", validate_name(app), *(["--owner", owner] if owner is not None else []))

    def define(self, app, manifest, owner=""):
        return self._call("define", validate_name(app), "--manifest", json.dumps(manifest), "--owner", owner)

    # --- images: a hostgrid's components are processes ---

    def images(self, refs):
        if refs:
            raise GridError(f"grid {self.grid.name!r}: a hostgrid runs no images ({', '.join(refs)})")
        return {}

    def open_image_export(self, ref):
        raise GridError(f"grid {self.grid.name!r}: a hostgrid has no images")

    def open_image_import(self):
        raise GridError(f"grid {self.grid.name!r}: a hostgrid has no images")

    # --- catalog ---

    def template_version(self, template):
        return self._call("template-version", validate_name(template, "template"))

    def install_template(self, template, files, version):
        """Install a catalog template from {relative path: bytes}, replacing any older one."""
        validate_name(template, "template")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for rel, data in sorted(files.items()):
                info = tarfile.TarInfo(check_relpath(rel))
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
        # The archive, and the template it unpacks to, must fit: say so before a write fails
        # half-way on a full disk.
        need = len(buf.getvalue()) + sum(len(data) for data in files.values()) + (1 << 20)
        free = self.info().free_bytes
        if free is not None and free < need:
            raise OperationFailed(
                f"disk full on {self.grid.name}: {free} bytes free in {self.grid.root}, installing the "
                f"{template} template needs about {need}"
            )
        archive = f"{self.grid.root}/.mig/tmp-{uuid.uuid4().hex}.tar.gz"
        self._put_grid_file(buf.getvalue(), archive, 0o600)
        return self._call("install-template", template, "--archive", archive, "--version", version)

    def ensure_template(self, template, files, version):
        """Install the template unless this exact version is already there."""
        if self.template_version(template) != version:
            self.install_template(template, files, version)
            return True
        return False

    # --- files inside an app ---

    def read_file(self, app, path, offset=0):
        """(text, new offset) of an app's file from `offset`; ("", offset) if absent."""
        data = self._call("read", validate_name(app), check_relpath(path), "--offset", str(int(offset)))
        return data["data"], data["offset"]

    def follow(self, app, path, offset=0, max_time=86400):
        """Yield the lines of an app's file as they are written, until the app stops."""
        args = [validate_name(app), check_relpath(path), "--offset", str(int(offset))]
        argv = self._argv("follow", [*args, "--max-time", str(max_time)])
        self.state(app)  # installs the agent if needed, and fails early if the app is gone
        yield from self.transport.stream(argv, timeout=max_time + 30)

    def rsync_source(self, app):
        path = f"{self.grid.root}/apps/{validate_name(app)}/volumes/"
        return RsyncSource(
            self.transport.rsync_location(path),
            self.transport.remote_shell(),
            # A restricted grid's gate must see the paths on the command line.
            protect_args=not self.grid.restricted,
        )

    def open_scan(self, app, hashes=False, wait=False, survey=False):
        """Start listing the app's volumes (see the agent's `scan`); returns the process.
        With `wait`, the listing begins once a line is written to its stdin.

        Streaming operations cannot install the agent on the fly: call another operation
        (describe, state) on this grid first.
        """
        flags = {"--hashes": hashes, "--wait": wait, "--survey": survey}
        args = [validate_name(app)] + [flag for flag, wanted in flags.items() if wanted]
        return self.transport.popen(self._argv("scan", args))

    def open_delta(self, app):
        """Start sending changed blocks of the app's files (see the agent's `delta`)."""
        return self.transport.popen(self._argv("delta", [validate_name(app)]))

    # --- the cut-over record ---

    def _cutover(self, op, app, *args):
        state = self._call(op, validate_name(app), *args)
        return Cutover(**{k: v for k, v in state.items() if k in CUTOVER_FIELDS}) if state else None

    def arm_cutover(self, app, job, job_id, action, target, timeout):
        return self._cutover(
            "cutover-arm", app, "--job", job, "--job-id", str(int(job_id)), "--action", action,
            "--target", target, "--timeout", str(float(timeout)),
        )  # fmt: skip

    def beat_cutover(self, app, job):
        self._call("cutover-beat", validate_name(app), "--job", job)

    def claim_cutover(self, app, job, decision, by, reason=""):
        return self._cutover(
            "cutover-claim", app, "--job", job, "--decision", decision, "--by", by, "--reason", reason
        )

    def abandon_cutover(self, app, job, by, reason=""):
        return self._cutover("cutover-abandon", app, "--job", job, "--by", by, "--reason", reason)

    def close_cutover(self, app, job):
        return self._cutover("cutover-close", app, "--job", job)

    def read_cutover(self, app):
        return self._cutover("cutover-read", app)

    def clear_cutover(self, app, job):
        return self._call("cutover-clear", validate_name(app), "--job", job)["cleared"]
