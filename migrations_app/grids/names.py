"""Names are checked here, before any command is built from them."""

import re

from .errors import InvalidName
from .hostgrid_agent import shorten

NAME_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
NAME_RE = re.compile(rf"^{NAME_PATTERN}\Z")
HELPER_PREFIX = "MigHelper_"


def validate_name(value, kind="app"):
    """Return `value` if it is a safe grid or app name, else raise InvalidName."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidName(
            f"invalid {kind} name {shorten(value)}: "
            "use 1-64 letters, digits, '_' or '-', starting with a letter"
        )
    return value


def helper_name(target_app):
    """The helper app for a job is named after its target app, as in the original."""
    name = HELPER_PREFIX + validate_name(target_app)
    # The prefix is 10 characters, so a long target name would overflow the limit.
    return validate_name(name, "helper app")
