"""
Snapshot copies as things an operator manages: list them with what their grids say now,
start one as an app of its own, delete one. (A refresh is a snapshot job into the copy:
see migration.preflight.)

Only a copy that carries the owner tag of the snapshot this app recorded is ever started
or deleted: a name on a grid is not enough.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import config
from .grids import AppNotFound, AppState, ConfigError, GridError
from .models import Snapshot


class SnapshotError(Exception):
    """The operation is refused; the message says why and what to do."""


@dataclass
class Seen:
    """A snapshot, with what its grid says of the copy now."""

    snapshot: Snapshot
    state: str  # the copy's AppState, "missing", or "unknown"
    url: str = ""
    problem: str = ""  # why the copy cannot be looked at, or is not this app's

    @property
    def refreshing(self):
        return self.snapshot.refreshing

    @property
    def can_start(self):
        return (
            self.usable and self.state == AppState.STOPPED and self.snapshot.state == Snapshot.State.COMPLETE
        )

    @property
    def can_refresh(self):
        return self.usable and self.state == AppState.STOPPED

    @property
    def can_delete(self):
        if self.state == "missing":
            return True  # only its record is left, to be marked deleted
        return self.usable and self.state in (AppState.STOPPED, AppState.FAILED)

    @property
    def usable(self):
        return not self.problem and not self.refreshing and self.snapshot.state != Snapshot.State.DELETED


def look(snapshot: Snapshot) -> Seen:
    """What the snapshot's grid says of its copy."""
    try:
        with config.driver_for(config.grid_config(snapshot.grid)) as driver:
            app = driver.describe(snapshot.app, sizes=False)
    except AppNotFound:
        return Seen(snapshot, "missing", problem=f"{snapshot.name} is not on its grid any more")
    except (GridError, ConfigError) as e:
        return Seen(snapshot, "unknown", problem=str(e))
    if app.manifest.get("owner") != snapshot.owner:
        return Seen(snapshot, app.state, app.url, f"{snapshot.name} is another app now: MIG leaves it alone")
    return Seen(snapshot, app.state, app.url)


def look_at_all(snapshots) -> list[Seen]:
    """Every snapshot, looked at on its grid (at once: grids may be slow to answer)."""
    snapshots = list(snapshots)
    if not snapshots:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(snapshots))) as pool:
        return list(pool.map(look, snapshots))


def start(snapshot: Snapshot, by: str) -> str:
    """Start the copy as an app of its own (with its own MIG, which clears the lock that
    travelled with it). Returns what happened."""
    seen = look(snapshot)
    if not seen.can_start:
        raise SnapshotError(refusal(seen, "started"))
    try:
        with config.driver_for(config.grid_config(snapshot.grid)) as driver:
            result = driver.start(snapshot.app, listen=True)
    except (GridError, ConfigError) as e:
        raise SnapshotError(f"{snapshot.name} did not start: {e}") from None
    snapshot.mark_started(by)
    where = f"; its MIG answers at {seen.url}" if seen.url and result.get("listening") else ""
    return f"Started {snapshot.name} as an app of its own{where}."


def delete(snapshot: Snapshot, by: str) -> str:
    """Remove the copy and its data from its grid. Returns what happened."""
    seen = look(snapshot)
    if seen.state == "missing":
        snapshot.mark_deleted(by)
        return f"{snapshot.name} was already gone from its grid; it is marked deleted."
    if not seen.can_delete:
        raise SnapshotError(refusal(seen, "deleted"))
    try:
        with config.driver_for(config.grid_config(snapshot.grid)) as driver:
            result = driver.destroy(snapshot.app, owner=snapshot.owner)
    except (GridError, ConfigError) as e:
        raise SnapshotError(f"{snapshot.name} could not be deleted: {e}") from None
    if result.get("kept"):
        raise SnapshotError(f"{snapshot.name} is another app now: MIG left it alone")
    snapshot.mark_deleted(by)
    leftovers = result.get("leftovers") or []
    return f"Deleted {snapshot.name} and its data" + (
        f" (left: {'; '.join(leftovers[:3])})" if leftovers else "."
    )


def refusal(seen: Seen, what: str) -> str:
    name = seen.snapshot.name
    if seen.snapshot.state == Snapshot.State.DELETED:
        return f"{name} was deleted"
    if seen.problem:
        return f"{name} cannot be {what}: {seen.problem}"
    if seen.refreshing:
        return f"{name} is being refreshed: wait for that job to end"
    if seen.snapshot.state == Snapshot.State.INCOMPLETE:
        return (
            f"{name} is incomplete (a refresh failed while it wrote into it): refresh it again, or delete it"
        )
    return f"{name} is {seen.state}: it can be {what} only while it is stopped"


def find(name: str) -> Snapshot:
    """The kept snapshot GRID/APP; raises SnapshotError."""
    grid, _, app = name.partition("/")
    snapshot = Snapshot.objects.kept().filter(grid=grid, app=app).first()
    if snapshot is None:
        known = ", ".join(s.name for s in Snapshot.objects.kept()) or "none"
        raise SnapshotError(f"this app made no snapshot {name!r} (its snapshots: {known})")
    return snapshot
