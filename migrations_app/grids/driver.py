"""
The driver interface: grid operations, whatever the grid is made of.

A driver turns operations into commands and runs them through a transport. Every name is
validated here, before any command is built from it.
"""

import enum
from dataclasses import dataclass, field

from .errors import GridError
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
            return "not initialised", f"{grid.root} is not a grid yet: run manage.py grids --init {grid.name}"
        if self.name != grid.name:
            return "WRONG GRID", f"{grid.root} is grid {self.name!r}, not {grid.name!r}"
        if not self.writable:
            return "read-only", f"{grid.root}/apps is not writable"
        if not self.rsync:
            return "no rsync", f"rsync is not installed on {grid.name}'s host"
        return None


class Driver:
    """Operations on one grid. Subclasses implement them for one kind of grid."""

    def __init__(self, grid: GridConfig, transport):
        self.grid = grid
        self.transport = transport

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def info(self) -> GridInfo:
        raise NotImplementedError

    def list_apps(self) -> list[App]:
        raise NotImplementedError

    def state(self, app) -> AppState:
        raise NotImplementedError

    def exists(self, app) -> bool:
        raise NotImplementedError

    def describe(self, app, sizes=True) -> App:
        raise NotImplementedError

    def provision(self, app, template, properties=None, secrets=None, start=True):
        raise NotImplementedError

    def start(self, app, listen=None, timeout=30.0):
        raise NotImplementedError

    def stop(self, app, grace=None, force=False):
        raise NotImplementedError

    def destroy(self, app) -> dict:
        raise NotImplementedError

    def define(self, app, manifest):
        """Create a stopped, empty app with `manifest` (volumes without data)."""
        raise NotImplementedError


def open_grid(grid: GridConfig, key_file, ssh_client="paramiko") -> Driver:
    """A driver for `grid`, with its transport (connected on first use)."""
    from .hostgrid import HostGridDriver

    drivers = {"hostgrid": HostGridDriver}
    if grid.driver not in drivers:
        raise GridError(f"grid {grid.name!r}: driver {grid.driver!r} is not available")
    return drivers[grid.driver](grid, open_transport(grid, key_file, ssh_client))
