"""
grid.info: the list of grids MIG can reach, one TOML table per grid.

    [grids.east]
    driver = "hostgrid"
    transport = "ssh"
    host = "203.0.113.10"
    host_key = "ssh-ed25519 AAAA..."
    root = "/srv/grid"

Every error names the file, the line where it can be found, the grid and the key.
"""

import base64
import binascii
import getpass
import posixpath
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .agent.base import IMAGE_RE
from .errors import ConfigError
from .names import NAME_RE, shorten

DRIVERS = ("hostgrid", "docker")
PLANNED_DRIVERS = ("libvirt",)
TRANSPORTS = ("local", "ssh")
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}\Z")
SSH_KEYS = ("host", "port", "user", "host_key", "restricted")
DOCKER_KEYS = ("image", "docker_socket")
# Where a docker grid's containers have the grid's own volume: its root, as the agent sees it.
DOCKER_ROOT = "/grid"
USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\Z", re.IGNORECASE)


@dataclass(frozen=True)
class GridConfig:
    name: str
    driver: str
    transport: str
    root: str
    host: str = ""
    port: int = 22
    user: str = ""
    host_key: str = ""
    # Where an app's MIG answers once it runs there; with "{port}", each app has its own
    # port, which the grid hands out from app_ports (low, high) when the app is created.
    app_url: str = ""
    app_ports: tuple[int, int] | None = None
    python: str = "python3"
    # MIG's key on this grid runs only MIG's gate (see gate.py, `grids --authorized-keys`).
    restricted: bool = False
    # Docker grids: the image MIG's agent, sidecars and helper run in (and components, by
    # default), and the engine's socket on the grid host.
    image: str = ""
    docker_socket: str = ""
    connect_timeout: float = 10.0
    command_timeout: float = 300.0

    @property
    def address(self):
        """How the grid is reached, for messages: `local` or `user@host:port`."""
        if self.transport == "local":
            return "local"
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def app_host(self):
        """The address apps on this grid listen on, taken from app_url."""
        return urlsplit(self.app_url.replace(PORT, "1")).hostname or ""

    @property
    def per_app_ports(self):
        """Whether each app on this grid answers on a port of its own."""
        return PORT in self.app_url

    def to_table(self):
        """This grid as its grid.info table: what the helper receives as JSON."""
        table = asdict(self)
        del table["name"]
        if self.transport == "local":
            for key in SSH_KEYS:
                del table[key]
        if self.driver == "docker":
            del table["root"]
        else:
            for key in DOCKER_KEYS:
                del table[key]
        return table

    @classmethod
    def from_table(cls, name, table, source="<helper config>"):
        """Rebuild a config that travelled as JSON, checking it as strictly as the file."""
        return _grid_config(name, table, _Locator(source, ""))


class _Locator:
    """Finds the line of a grid's table or key in the file text, for error messages."""

    def __init__(self, path, text):
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, grid, key=None):
        header = re.compile(rf"^\s*\[\s*grids\s*\.\s*\"?{re.escape(grid)}\"?\s*\]")
        start = next((i for i, line in enumerate(self.lines) if header.match(line)), None)
        if start is None:
            return None
        if key is None:
            return start + 1
        key_re = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        for i in range(start + 1, len(self.lines)):
            if self.lines[i].lstrip().startswith("["):
                break
            if key_re.match(self.lines[i]):
                return i + 1
        return start + 1

    def error(self, grid, key, message):
        line = self.line_of(grid, key)
        where = f"{self.path}" + (f": line {line}" if line else "")
        what = f"grid {shorten(grid)}" + (f", key {shorten(key)}" if key else "")
        return ConfigError(f"{where}: {what}: {message}")


def _require_str(loc, grid, key, value):
    if not isinstance(value, str) or not value.strip():
        raise loc.error(grid, key, "must be a non-empty string")
    return value.strip()


def _number(loc, grid, key, value, low, high, kind=float):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise loc.error(grid, key, f"must be a number from {low} to {high}")
    if kind is int and not isinstance(value, int):
        raise loc.error(grid, key, f"must be a whole number from {low} to {high}")
    if not low <= value <= high:
        raise loc.error(grid, key, f"must be from {low} to {high} (got {value})")
    return kind(value)


def _host_key(loc, grid, value):
    value = _require_str(loc, grid, "host_key", value)
    parts = value.split()
    if len(parts) < 2 or parts[0] not in HOST_KEY_TYPES:
        raise loc.error(
            grid,
            "host_key",
            "must look like 'ssh-ed25519 AAAA...' (a line of the host's "
            "/etc/ssh/ssh_host_*_key.pub), with a type of " + ", ".join(HOST_KEY_TYPES),
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise loc.error(grid, "host_key", "the key is not valid base64") from None
    # The key blob starts with its own type name; a mismatch means a pasting mistake.
    if blob[4 : 4 + len(parts[0])] != parts[0].encode():
        raise loc.error(grid, "host_key", f"the key data is not a {parts[0]} key")
    return f"{parts[0]} {parts[1]}"


def _root(loc, grid, value):
    value = _require_str(loc, grid, "root", value)
    if not value.startswith("/"):
        raise loc.error(grid, "root", "must be an absolute path")
    if ".." in value.split("/") or value != posixpath.normpath(value) or value == "/":
        raise loc.error(grid, "root", f"must be a normalised path below / (got {shorten(value)})")
    return value


PORT = "{port}"


def _app_url(loc, grid, value):
    value = _require_str(loc, grid, "app_url", value)
    if value.replace(PORT, "").count("{") or value.replace(PORT, "").count("}"):
        raise loc.error(grid, "app_url", "may hold one placeholder, {port} (each app's own port)")
    parts = urlsplit(value.replace(PORT, "1"))
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise loc.error(grid, "app_url", "has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise loc.error(grid, "app_url", "must be an http:// or https:// URL with a host")
    if PORT in value and not urlsplit(value).netloc.endswith(f":{PORT}"):
        raise loc.error(grid, "app_url", "has {port} where the port goes: http://HOST:{port}/")
    return value if value.endswith("/") else value + "/"


def _app_ports(loc, grid, value, app_url):
    if value is None:
        if PORT in app_url:
            raise loc.error(grid, "app_ports", "is required when app_url has {port}: [LOW, HIGH]")
        return None
    if PORT not in app_url:
        raise loc.error(grid, "app_ports", "needs an app_url with {port}, e.g. http://HOST:{port}/")
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(type(v) is int for v in value)):
        raise loc.error(grid, "app_ports", "must be [LOW, HIGH], two port numbers")
    low, high = value
    if not 1 <= low <= high <= 65535:
        raise loc.error(grid, "app_ports", f"must be ports from 1 to 65535, LOW <= HIGH (got {low}, {high})")
    return low, high


KEYS = {
    "driver",
    "transport",
    "host",
    "port",
    "user",
    "host_key",
    "root",
    "app_url",
    "app_ports",
    "python",
    "restricted",
    "connect_timeout",
    "command_timeout",
    *DOCKER_KEYS,
}


def _docker(loc, grid, table):
    """A docker grid's own keys: its image, the engine's socket; its root is fixed."""
    if "root" in table:
        raise loc.error(grid, "root", "does not apply to a docker grid (its apps live in the engine)")
    if "image" not in table:
        raise loc.error(grid, "image", "is required for a docker grid: the image MIG runs in there")
    image = _require_str(loc, grid, "image", table["image"])
    if not IMAGE_RE.match(image):
        raise loc.error(grid, "image", f"is not an image reference: {shorten(image)}")
    socket = _require_str(loc, grid, "docker_socket", table.get("docker_socket", "/var/run/docker.sock"))
    if not posixpath.isabs(socket) or posixpath.normpath(socket) != socket or " " in socket:
        raise loc.error(grid, "docker_socket", f"must be an absolute path: {shorten(socket)}")
    return {"root": DOCKER_ROOT, "image": image, "docker_socket": socket}


def _grid_config(name, table, loc):
    if not NAME_RE.match(name):
        raise loc.error(name, None, "grid names use letters, digits, '_' or '-', from a letter")
    if not isinstance(table, dict):
        raise loc.error(name, None, "must be a table ([grids.NAME])")
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise loc.error(name, unknown[0], f"unknown key (known: {', '.join(sorted(KEYS))})")
    for required in ("driver", "transport"):
        if required not in table:
            raise loc.error(name, required, "is required")

    driver = _require_str(loc, name, "driver", table["driver"])
    if driver in PLANNED_DRIVERS:
        known = " or ".join(DRIVERS)
        raise loc.error(name, "driver", f"driver {shorten(driver)} is not available yet (use {known})")
    if driver not in DRIVERS:
        raise loc.error(name, "driver", f"unknown driver {shorten(driver)} (known: {', '.join(DRIVERS)})")
    transport = _require_str(loc, name, "transport", table["transport"])
    if transport not in TRANSPORTS:
        raise loc.error(name, "transport", f"unknown transport {shorten(transport)} (known: local, ssh)")

    values = {"name": name, "driver": driver, "transport": transport}
    if driver == "docker":
        values.update(_docker(loc, name, table))
    else:
        if "root" not in table:
            raise loc.error(name, "root", "is required")
        for key in DOCKER_KEYS:
            if key in table:
                raise loc.error(name, key, 'only applies to driver = "docker"')
        values["root"] = _root(loc, name, table["root"])
    if transport == "ssh":
        for required in ("host", "host_key"):
            if required not in table:
                why = " (MIG never trusts a host key it was not given)" if required == "host_key" else ""
                raise loc.error(name, required, f"is required for an ssh grid{why}")
        host = _require_str(loc, name, "host", table["host"])
        if not HOST_RE.match(host):
            raise loc.error(name, "host", f"is not a host name or address: {shorten(host)}")
        if host.startswith("-"):  # ssh and rsync would take it for an option
            raise loc.error(name, "host", f"must not begin with '-': {shorten(host)}")
        values["host"] = host
        values["host_key"] = _host_key(loc, name, table["host_key"])
        values["port"] = _number(loc, name, "port", table.get("port", 22), 1, 65535, int)
        user = _require_str(loc, name, "user", table.get("user", getpass.getuser()))
        if not USER_RE.match(user):
            raise loc.error(name, "user", f"is not a valid user name: {shorten(user)}")
        values["user"] = user
        restricted = table.get("restricted", False)
        if not isinstance(restricted, bool):
            raise loc.error(name, "restricted", "must be true or false")
        if restricted and driver == "docker":
            raise loc.error(
                name,
                "restricted",
                "is for hostgrid grids: a key that may run docker on a host can do anything there",
            )
        values["restricted"] = restricted
    else:
        for ssh_only in SSH_KEYS:
            if ssh_only in table:
                raise loc.error(name, ssh_only, 'only applies to transport = "ssh"')
    values["app_url"] = _app_url(
        loc, name, table.get("app_url", f"http://{values.get('host') or '127.0.0.1'}:8080/")
    )
    values["app_ports"] = _app_ports(loc, name, table.get("app_ports"), values["app_url"])
    if "python" in table:
        python = _require_str(loc, name, "python", table["python"])
        if python.startswith("-") or any(c.isspace() for c in python):
            raise loc.error(name, "python", "must be a program name or path")
        values["python"] = python
    for key, high in (("connect_timeout", 300), ("command_timeout", 86400)):
        if key in table:
            values[key] = _number(loc, name, key, table[key], 1, high)
    return GridConfig(**values)


def parse(text, path="grid.info"):
    """Parse grid.info text into {name: GridConfig}, in file order."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    loc = _Locator(path, text)
    extra = sorted(set(data) - {"grids"})
    if extra:
        raise ConfigError(f"{path}: unknown top-level key {shorten(extra[0])} (grids go in [grids.NAME])")
    grids = data.get("grids", {})
    if not isinstance(grids, dict):
        raise ConfigError(f"{path}: 'grids' must be a table of [grids.NAME] tables")
    return {name: _grid_config(name, table, loc) for name, table in grids.items()}


def load(path):
    """Read and parse the grid.info file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: grid.info not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read grid.info: {e}") from None
    return parse(text, str(path))
