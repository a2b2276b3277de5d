"""Errors of the grids layer. Each carries a message fit to show an operator as is."""


class GridError(Exception):
    """Base class: something about a grid, its config or an app on it is wrong."""


class ConfigError(GridError):
    """grid.info is missing, unreadable or invalid."""


class InvalidName(GridError, ValueError):
    """An app or grid name that could not be used safely in a command."""


class TransportError(GridError):
    """The grid host could not be reached or the connection broke."""


class HostKeyError(TransportError):
    """The host presented a key other than the one pinned in grid.info."""


class AuthError(TransportError):
    """The private key is unusable or was refused."""


class CommandTimeout(TransportError):
    """A command on the grid host did not finish in time."""


class CommandFailed(GridError):
    """A command on the grid host exited non-zero."""

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


class AppNotFound(GridError):
    pass


class AppExists(GridError):
    pass


class OperationFailed(GridError):
    """The grid refused or could not complete an operation (start, stop, ...)."""
