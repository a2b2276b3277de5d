"""
MIG's grids layer: grid.info, transports and drivers.

Django-free on purpose: the helper runs this package on grid hosts that have only Python.
"""

from .driver import App, AppState, Cutover, Decision, Driver, open_grid
from .errors import (
    AppExists,
    AppNotFound,
    AuthError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    GridError,
    HostKeyError,
    InvalidName,
    OperationFailed,
    TransportError,
)
from .gridinfo import GridConfig
from .hostgrid import authorized_keys_line
from .names import TARGET_NAME_MAX, helper_name, validate_name, validate_target_name

__all__ = [
    "TARGET_NAME_MAX",
    "App",
    "AppExists",
    "AppNotFound",
    "AppState",
    "AuthError",
    "CommandFailed",
    "CommandTimeout",
    "ConfigError",
    "Cutover",
    "Decision",
    "Driver",
    "GridConfig",
    "GridError",
    "HostKeyError",
    "InvalidName",
    "OperationFailed",
    "TransportError",
    "authorized_keys_line",
    "helper_name",
    "open_grid",
    "validate_name",
    "validate_target_name",
]
