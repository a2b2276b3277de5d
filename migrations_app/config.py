"""MIG's view of its own configuration: grid.info, the private key, where it runs."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings

from .grids import ConfigError, Driver, GridConfig, gridinfo, open_grid


def grid_configs():
    """{name: GridConfig} from MIG_GRID_INFO_FILE; raises ConfigError with a clear message."""
    return gridinfo.load(settings.MIG_GRID_INFO_FILE)


def grid_config(name):
    configs = grid_configs()
    if name not in configs:
        raise ConfigError(
            f"grid {name!r} is not in {settings.MIG_GRID_INFO_FILE} (known: {', '.join(configs) or 'none'})"
        )
    return configs[name]


@contextmanager
def driver_for(config: GridConfig) -> Iterator[Driver]:
    """A driver for a grid, authenticating with MIG's private key, for the `with` block's
    use alone; closed after it, unless drivers are kept (keeping_drivers)."""
    pool = _kept
    if pool is None:
        with open_grid(config, settings.MIG_PRIVATE_KEY_FILE) as driver:
            yield driver
        return
    driver = pool.take(config) or open_grid(config, settings.MIG_PRIVATE_KEY_FILE)
    try:
        yield driver
    except BaseException:
        # Whatever went wrong may have left it half-way (an agent mid-answer): not reused.
        driver.close()
        raise
    pool.put_back(config, driver)


class DriverPool:
    """Connected drivers not in use, by grid. A driver is used by one `with` at a time:
    pre-flight checks two grids in two threads."""

    def __init__(self):
        self._idle: dict[GridConfig, list[Driver]] = {}
        self._lock = threading.Lock()

    def take(self, config: GridConfig) -> Driver | None:
        with self._lock:
            idle = self._idle.get(config)
            return idle.pop() if idle else None

    def put_back(self, config: GridConfig, driver: Driver) -> None:
        with self._lock:
            self._idle.setdefault(config, []).append(driver)

    def close(self) -> None:
        with self._lock:
            drivers = [d for idle in self._idle.values() for d in idle]
            self._idle.clear()
        for driver in drivers:
            driver.close()


_kept: DriverPool | None = None


@contextmanager
def keeping_drivers() -> Iterator[None]:
    """Within it, a driver is kept connected between uses (and closed at the end): a command
    that checks a job, provisions it, then follows it pays for each grid's connection (an
    SSH handshake and an agent start, 0.3 s on a quiet host) once, not at each step."""
    global _kept
    if _kept is not None:
        yield
        return
    _kept = DriverPool()
    try:
        yield
    finally:
        pool, _kept = _kept, None
        pool.close()


def here():
    """(grid, app) this copy of MIG runs in, as the grid told it."""
    return settings.MIG_GRID, settings.MIG_APP
