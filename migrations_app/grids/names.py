"""Names are checked here, before any command is built from them."""

import re

from .agent.base import shorten
from .errors import InvalidName

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


# A target's helper is named after it, and that name must fit the limit too.
TARGET_NAME_MAX = 64 - len(HELPER_PREFIX)


def validate_target_name(value):
    """A name a job may give its target app: a safe name, short enough for its helper's."""
    if isinstance(value, str) and len(value) > TARGET_NAME_MAX:
        raise InvalidName(
            f"a target app's name has at most {TARGET_NAME_MAX} characters (this one has {len(value)}): "
            f"its helper is named {HELPER_PREFIX}<name>, and that must fit in 64"
        )
    return validate_name(value)


def helper_name(target_app):
    """The helper app for a job is named after its target app, as in the original."""
    return HELPER_PREFIX + validate_target_name(target_app)
