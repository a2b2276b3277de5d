"""Shared fixtures: throw-away config volumes, manage.py in a subprocess, grids, sshd."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mig_env(config_dir, **extra):
    """An environment for a MIG process on `config_dir`, with nothing inherited from ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIG_") and k != "SECRET_KEY"}
    env["DJANGO_SETTINGS_MODULE"] = "migsite.settings"
    env["MIG_CONFIG_DIR"] = str(config_dir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_manage(config_dir, *args, env=None, timeout=120, check=False):
    """Run `manage.py ARGS` as MIG would be run, in its own process."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=mig_env(config_dir, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def config_dir(tmp_path):
    path = tmp_path / "config"
    path.mkdir()
    return path


# --- grids -------------------------------------------------------------------------------

from migrations_app.grids import gridinfo, open_grid  # noqa: E402

from .sshd import GRID_PYTHON, free_port, keygen, start_sshd  # noqa: E402

# Two grid hosts, as two real OpenSSH servers on loopback addresses.
GRID_HOSTS = ("127.0.0.2", "127.0.0.3")

WEB_TEMPLATE = {
    "manifest.json": json.dumps(
        {
            "properties": {"port": None, "bind": None, "greeting": "hello"},
            "volumes": ["www", "data"],
            "start_settle": 0.3,
            "stop_grace": 3,
            "components": [
                {
                    "name": "http",
                    "command": ["{python}", "-m", "http.server", "{prop:port}", "--bind", "{prop:bind}"],
                    "cwd": "{volume:www}",
                }
            ],
        }
    ).encode(),
    "volumes/www/index.html": b"hello from the catalog\n",
}


@pytest.fixture(scope="session")
def client_key(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("client") / "id_ed25519", "mig-client")


@pytest.fixture(scope="session")
def ssh_hosts(tmp_path_factory, client_key):
    base = tmp_path_factory.mktemp("sshd")
    hosts = []
    try:
        for i, address in enumerate(GRID_HOSTS):
            hosts.append(start_sshd(base / f"host{i}", address, f"{client_key}.pub"))
        yield hosts
    finally:
        for host in hosts:
            host.stop()


def grid_table(kind, root, ssh_hosts=None, host_index=0, app_port=8080):
    if kind == "ssh":
        return ssh_hosts[host_index].grid_table(root, app_port)
    address = GRID_HOSTS[host_index]
    return (
        f'driver = "hostgrid"\ntransport = "local"\nroot = "{root}"\npython = "{GRID_PYTHON}"\n'
        f'app_url = "http://{address}:{app_port}/"\n'
    )


@pytest.fixture(params=["local", "ssh"])
def grid(request, tmp_path, client_key):
    """A fresh, initialised hostgrid grid with a `web` template, over each transport."""
    hosts = request.getfixturevalue("ssh_hosts") if request.param == "ssh" else None
    text = "[grids.east]\n" + grid_table(request.param, tmp_path / "east", hosts)
    config = gridinfo.parse(text)["east"]
    driver = open_grid(config, client_key)
    driver.init()
    driver.install_template("web", WEB_TEMPLATE, "1")
    yield driver
    for app in driver.list_apps():
        driver.destroy(app.name)
    driver.close()


def port_range(address, size=40):
    """[LOW, HIGH]: ports from a free one on, for a grid that gives each app its own (the
    grid skips any that something holds when it hands one out)."""
    low = min(free_port(address), 65535 - size)
    return [low, low + size - 1]


@pytest.fixture(params=["local", "ssh"])
def ported(request, tmp_path, client_key):
    """A fresh hostgrid grid whose apps each answer on a port of their own (app_url with
    {port}, app_ports), over each transport."""
    hosts = request.getfixturevalue("ssh_hosts") if request.param == "ssh" else None
    table = grid_table(request.param, tmp_path / "east", hosts).replace(":8080/", ":{port}/")
    table += f"app_ports = {port_range(GRID_HOSTS[0])}\n"
    config = gridinfo.parse("[grids.east]\n" + table)["east"]
    driver = open_grid(config, client_key)
    driver.init()
    yield driver
    for app in driver.list_apps():
        driver.destroy(app.name)
    driver.close()


@pytest.fixture
def web_port():
    return free_port(GRID_HOSTS[0])


@pytest.fixture
def world(tmp_path, ssh_hosts, client_key):
    from .world import World

    w = World(tmp_path, ssh_hosts, client_key)
    yield w
    w.close()


@pytest.fixture
def operator(db, settings, django_user_model):
    """MIG with a login, and a client logged in as its user."""
    settings.MIG_USERNAME = "operator"
    settings.MIG_PASSWORD = "correct horse"
    return django_user_model.objects.create_user("operator", password="correct horse", is_staff=True)


@pytest.fixture
def logged_in(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def grids(tmp_path, settings, ssh_hosts, client_key):
    """MIG running in east/shop, with grids east and west on two real sshd, plus two bad ones:
    `gone` (nothing listens) and `spoofed` (west's address, east's host key)."""
    from migrations_app.models import Grid

    a, b = ssh_hosts
    closed = free_port(b.address)
    tables = {
        "east": a.grid_table(tmp_path / "east"),
        "west": b.grid_table(tmp_path / "west"),
        "gone": b.grid_table(tmp_path / "gone").replace(f"port = {b.port}", f"port = {closed}"),
        "spoofed": b.grid_table(tmp_path / "spoofed").replace(b.host_key, a.host_key),
    }
    path = tmp_path / "grid.info"
    path.write_text("".join(f"[grids.{name}]\n{table}\n" for name, table in tables.items()))
    settings.MIG_GRID_INFO_FILE = path
    settings.MIG_PRIVATE_KEY_FILE = client_key
    settings.MIG_GRID, settings.MIG_APP = "east", "shop"
    configs = gridinfo.load(path)
    drivers = {name: open_grid(configs[name], client_key) for name in ("east", "west")}
    for driver in drivers.values():
        driver.init()
    drivers["east"].install_template("web", WEB_TEMPLATE, "1")
    drivers["east"].provision("shop", "web", {"port": str(free_port(a.address)), "bind": a.address})
    Grid.objects.sync_from(configs)
    yield drivers
    for driver in drivers.values():
        for app in driver.list_apps():
            driver.destroy(app.name)
        driver.close()
