"""
The driver interface: grid operations, whatever the grid is made of.

A driver turns operations into commands and runs them through a transport. Every name is
validated here, before any command is built from it.
"""

import abc
import enum
from dataclasses import dataclass, field

from .errors import AppNotFound, GridError
from .gridinfo import GridConfig
from .transport import open_transport


class AppState(enum.StrEnum):
    """As in AppLogic."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass
class Volume:
    name: str
    path: str
    bytes: int | None = None
    files: int | None = None


@dataclass
class Component:
    name: str
    pid: int | None
    command: list


@dataclass
class App:
    name: str
    state: AppState
    path: str = ""
    # The directory holding the app's volumes, one directory each, as processes on the
    # grid host see it, and apps provisioned to reach this one (see Driver.provision).
    volumes_dir: str = ""
    url: str = ""  # where the grid publishes the app (its own port, if the grid gives those)
    manifest: dict = field(default_factory=dict)
    volumes: list = field(default_factory=list)
    components: list = field(default_factory=list)

    @property
    def bytes(self):
        return sum(v.bytes or 0 for v in self.volumes)

    @property
    def files(self):
        return sum(v.files or 0 for v in self.volumes)


@dataclass
class GridInfo:
    """What a grid says about itself."""

    name: str | None
    app_url: str | None
    initialised: bool
    writable: bool
    free_bytes: int | None
    total_bytes: int | None
    apps: int
    python: str
    rsync: bool
    time: float  # the host's clock, for comparing file times there

    def problem(self, grid: GridConfig):
        """(short label, message) of what keeps `grid` from taking apps, or None if nothing."""
        if not self.initialised:
            where = (
                f"{grid.name}'s engine has no grid"
                if grid.driver == "docker"
                else f"{grid.root} is not a grid"
            )
            return "not initialised", f"{where} yet: run manage.py grids --init {grid.name}"
        if self.name != grid.name:
            return "WRONG GRID", f"{grid.root} is grid {self.name!r}, not {grid.name!r}"
        if not self.writable:
            return "read-only", f"{grid.root}/apps is not writable"
        if not self.rsync:
            return "no rsync", f"rsync is not installed on {grid.name}'s host"
        return None


@dataclass(frozen=True)
class Image:
    """An image an app's components run, as one grid has it."""

    ref: str
    id: str | None  # None: the grid does not have it
    size: int = 0


@dataclass(frozen=True)
class Prepared:
    """What a prepared start readied: the components whose start is now as short as an
    exec (or a container start), and, for the others, why they will start afresh."""

    ready: tuple[str, ...]
    cold: dict[str, str]


@dataclass(frozen=True)
class RsyncSource:
    """Where rsync reads an app's volumes from: its SRC (ending in /), its -e remote shell
    (None: the volumes are on the host rsync runs on), and whether --protect-args may be
    used (a restricted grid's gate must see the paths)."""

    path: str
    remote_shell: str | None = None
    protect_args: bool = True


class Decision(enum.StrEnum):
    """The one decision of a cut-over."""

    COMMIT = "commit"  # the copy is the app from now on (migrate), or is kept (snapshot)
    ROLLBACK = "rollback"  # the source is the app; the copy is removed


@dataclass(frozen=True)
class Cutover:
    """The cut-over record of a migration from an app (DESIGN.md, "The cut-over protocol")."""

    job: str  # the job's uid
    job_id: int
    action: str  # migrate | snapshot
    target: str  # "grid/app"
    timeout: float  # seconds of silence after which the watchdog rolls back
    armed_at: float
    decision: Decision | None = None  # once made, never changes
    decided_by: str = ""  # helper | watchdog | operator
    decided_at: str | None = None
    reason: str = ""
    abandoned: bool = False  # a committed target that never started was given up
    closed: bool = False  # the helper carried out the decision
    heartbeat_age: float | None = None
    watchdog: bool = False  # the watchdog process is alive

    def __post_init__(self):
        if self.decision is not None:
            object.__setattr__(self, "decision", Decision(self.decision))

    @property
    def source_may_run(self) -> bool:
        """Whether the source app may run again (migrate: only if not moved for good)."""
        if self.decision == Decision.ROLLBACK or self.abandoned:
            return True
        return self.decision == Decision.COMMIT and self.action == "snapshot"

    @property
    def moved(self) -> bool:
        """A migration committed, not given up: the target is the app now."""
        return self.decision == Decision.COMMIT and self.action == "migrate" and not self.abandoned


def images_of(manifest: dict) -> list[str]:
    """The images a manifest's components run, as its grid pinned them."""
    return sorted({c["image"] for c in manifest.get("components", []) if c.get("image")})


class Driver(abc.ABC):
    """Operations on one grid; a subclass implements them for one kind of grid.

    This is the whole contract: callers use nothing else, and know nothing of a grid's
    layout. Every operation validates the names it is given before any command is built
    (InvalidName), raises TransportError when the grid cannot be reached (HostKeyError for a
    host key other than the pinned one), AppNotFound for an app that does not exist, and
    OperationFailed with the grid's reason when the grid refuses or fails.
    """

    def __init__(self, grid: GridConfig, transport):
        self.grid = grid
        self.transport = transport

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the grid ---

    @abc.abstractmethod
    def info(self) -> GridInfo:
        """What the grid says about itself: name, free space, programs, clock."""

    @abc.abstractmethod
    def init(self) -> bool:
        """Make the grid ready to take apps; True if anything changed. Idempotent."""

    # --- apps ---

    @abc.abstractmethod
    def list_apps(self) -> list[App]:
        """Every app on the grid, with its state."""

    @abc.abstractmethod
    def state(self, app: str) -> AppState:
        """The app's state. Raises AppNotFound."""

    def exists(self, app: str) -> bool:
        try:
            self.state(app)
        except AppNotFound:
            return False
        return True

    @abc.abstractmethod
    def describe(self, app: str, sizes: bool = True) -> App:
        """The app's manifest, components, volumes (with sizes unless sizes=False) and the
        URL the grid publishes it at."""

    @abc.abstractmethod
    def provision(
        self,
        app: str,
        template: str,
        properties=None,
        secrets=None,
        start=True,
        owner: str = "",
        reaches: str = "",
    ):
        """Create an app from a catalog template, recording `owner` (see define), give it
        its secrets (files only the app can read, never in a command line), and start it.
        With `reaches`, another app of this grid whose volumes the new app's components
        reach, at that app's `volumes_dir` (the helper reaches its target so). Raises
        AppExists."""

    @abc.abstractmethod
    def define(self, app: str, manifest: dict, owner: str = ""):
        """Create a stopped, empty app with `manifest` (its volumes without data), recording
        `owner` (who created it: clean-up removes only what it owns). On a grid that gives
        each app its own URL, the app gets one (the manifest's is not reused). Raises
        AppExists; OperationFailed when the grid has no port left to give."""

    @abc.abstractmethod
    def start(self, app: str, listen: bool = False, timeout: float = 30.0) -> dict:
        """Start the app's stopped components. Started means: up for the manifest's settle
        time, or with `listen`, listening where the grid publishes the app; the answer's
        "listening" is False if nothing listened within `timeout`. A component that exits at
        start fails the start, and the app is stopped again. Refused (OperationFailed) while
        the app's cut-over record forbids it to run. Idempotent."""

    @abc.abstractmethod
    def prepare_start(self, app: str, wait: float = 1800.0) -> Prepared:
        """Ready the stopped app's next start ahead of it, running nothing of the app: what
        can be done before its data is final (a Python component's interpreter and the
        modules its manifest's `preload` names, outside the app's files; a container
        created). A start within `wait` seconds, of the same manifest, uses it; a stop or
        destroy ends it; after `wait` it ends by itself. Raises AppNotFound."""

    @abc.abstractmethod
    def stop(self, app: str, grace: float | None = None, force: bool = False) -> dict:
        """Stop every component (SIGTERM, then SIGKILL only with `force`). Idempotent.
        Raises OperationFailed if a component outlived the grace time."""

    @abc.abstractmethod
    def destroy(self, app: str, owner: str | None = None) -> dict:
        """Stop the app by force and remove it with its data; {"existed", "leftovers",
        "kept"}. With `owner`, an app defined by another owner is kept ("kept": True), not
        removed: clean-up never removes what its job did not create. Idempotent."""

    def app_images(self, app: str) -> list[str]:
        """The images the app's components run (none on a grid whose components are
        processes). Raises AppNotFound."""
        return images_of(self.describe(app, sizes=False).manifest)

    # --- images (grids whose apps run images) ---

    @abc.abstractmethod
    def images(self, refs: list[str]) -> dict[str, Image]:
        """The images of these references as this grid has them (id None where it has
        none). GridError on a grid whose apps run no images."""

    @abc.abstractmethod
    def open_image_export(self, ref: str):
        """Start writing the image `ref` to the process's stdout, as an archive that
        open_image_import takes."""

    @abc.abstractmethod
    def open_image_import(self):
        """Start loading an image archive from the process's stdin; it exits 0 once the
        image is on the grid."""

    # --- catalog ---

    @abc.abstractmethod
    def ensure_template(self, template: str, files: dict, version: str) -> bool:
        """Install a catalog template from {relative path: bytes} unless this version is
        there; True if it was installed."""

    # --- files inside an app ---

    # Paths inside an app are relative to it: "volumes/VOLUME/...", "secrets/NAME", and
    # "cutover/..." for its cut-over record's files. None is reached through a symlink.

    @abc.abstractmethod
    def put_file(self, app: str, path: str, data: bytes, mode: int = 0o600):
        """Write a file inside the app (a volume's content, a secret), atomically, making
        the directories on the way."""

    @abc.abstractmethod
    def read_file(self, app: str, path: str, offset: int = 0) -> tuple[str, int]:
        """(text, new offset) of an app's file from `offset`; ("", offset) if absent."""

    @abc.abstractmethod
    def follow(self, app: str, path: str, offset: int = 0, max_time: float = 86400):
        """Yield the lines of an app's file as they are written, until the app stops."""

    # --- the final pass ---

    @abc.abstractmethod
    def rsync_source(self, app: str) -> RsyncSource:
        """Where rsync, run where this driver runs (the helper, on the target grid's host),
        reads the app's volumes: their directory, whole, so that one rsync copies them all
        into the target's `volumes_dir`. Needs a transport rsync can use (local or OpenSSH):
        GridError otherwise."""

    @abc.abstractmethod
    def open_scan(self, app: str, hashes: bool = False, wait: bool = False, survey: bool = False):
        """Start listing the app's volumes, one JSON entry per line (see the sync module);
        a process-like object. With `wait`, the listing begins once a line is written to
        its stdin. With `survey`, the agent then waits for a sweep request and answers it
        (see the agent's tree module, "the survey")."""

    @abc.abstractmethod
    def open_delta(self, app: str):
        """Start the sender of changed blocks of the app's files (see the sync module)."""

    # --- the cut-over record (DESIGN.md, "The cut-over protocol") ---

    @abc.abstractmethod
    def arm_cutover(
        self, app: str, job: str, job_id: int, action: str, target: str, timeout: float
    ) -> Cutover:
        """Create the app's cut-over record for `job` and start its watchdog on the grid,
        which rolls back if no heartbeat comes for `timeout` seconds. Idempotent for the
        same job; refused while another job's cut-over of this app is unfinished."""

    @abc.abstractmethod
    def beat_cutover(self, app: str, job: str):
        """The helper is alive. Raises AppNotFound if the record is not `job`'s."""

    @abc.abstractmethod
    def claim_cutover(self, app: str, job: str, decision: str, by: str, reason: str = "") -> Cutover:
        """Decide commit or rollback, unless a decision was made: the answer holds the one
        that stands, which the caller obeys. Durable before it returns."""

    @abc.abstractmethod
    def abandon_cutover(self, app: str, job: str, by: str, reason: str = "") -> Cutover:
        """Give up a committed target that never started, so the source may run again."""

    @abc.abstractmethod
    def close_cutover(self, app: str, job: str) -> Cutover:
        """The decision was carried out: the watchdog may leave."""

    @abc.abstractmethod
    def read_cutover(self, app: str) -> Cutover | None:
        """The app's cut-over record, or None."""

    @abc.abstractmethod
    def clear_cutover(self, app: str, job: str) -> bool:
        """Remove `job`'s record once its job has ended; False if there was none."""


def open_grid(grid: GridConfig, key_file, ssh_client="paramiko") -> Driver:
    """A driver for `grid`, with its transport (connected on first use)."""
    from .docker import DockerDriver
    from .hostgrid import HostGridDriver

    drivers = {"hostgrid": HostGridDriver, "docker": DockerDriver}
    if grid.driver not in drivers:
        raise GridError(f"grid {grid.name!r}: driver {grid.driver!r} is not available")
    return drivers[grid.driver](grid, open_transport(grid, key_file, ssh_client))
