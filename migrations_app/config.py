"""MIG's view of its own configuration: grid.info, the private key, where it runs."""

from django.conf import settings

from .grids import ConfigError, gridinfo, open_grid


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


def driver_for(config):
    """A driver for a grid, authenticating with MIG's private key."""
    return open_grid(config, settings.MIG_PRIVATE_KEY_FILE)


def here():
    """(grid, app) this copy of MIG runs in, as the grid told it."""
    return settings.MIG_GRID, settings.MIG_APP
