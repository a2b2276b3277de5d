"""Shared fixtures: throw-away config volumes, manage.py in a subprocess, grids, sshd."""

import json
import os
import signal
import subprocess
import sys
import threading
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


def popen_demo(tmp_path, port, *options, sigint_ignored=False):
    """`manage.py demo` as the README runs it, under `tmp_path`; its output in one text pipe.
    `sigint_ignored`: started as a script's background job is, with SIGINT ignored."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--dir", str(tmp_path / "demo"), "--port", str(port), *options],
        cwd=ROOT,
        # Its faulthandler says where each thread is when a test that waited in vain aborts it.
        env=mig_env(tmp_path / "config", PYTHONFAULTHANDLER=1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )


def ctrl_c(demo, timeout=120) -> str:
    """Ctrl-C to a demo: what it printed until it ended; if it does not end, a failure with
    where each of its threads is (popen_demo runs it with Python's faulthandler, which
    SIGABRT wakes)."""
    demo.send_signal(signal.SIGINT)
    try:
        return demo.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired as e:
        said = e.output.decode() if isinstance(e.output, bytes) else e.output or ""
        demo.send_signal(signal.SIGABRT)
        said += demo.communicate(timeout=60)[0]
        pytest.fail(f"the demo did not end in {timeout}s after a Ctrl-C; it said:\n{said}")


def said_until(proc, marker) -> str:
    """What `proc` printed up to the first line holding `marker` (or to its end)."""
    said = []
    for line in proc.stdout:
        said.append(line)
        if marker in line:
            break
    return "".join(said)


@pytest.fixture
def config_dir(tmp_path):
    path = tmp_path / "config"
    path.mkdir()
    return path


# --- grids -------------------------------------------------------------------------------

from migrations_app.grids import gridinfo, open_grid  # noqa: E402

from .sshd import GRID_PYTHON, free_port, keygen, start_sshd  # noqa: E402

# Two grid hosts, as two real OpenSSH servers on loopback addresses: each of pytest-xdist's
# workers (gw0, gw1, ...) on addresses of its own, so that ports one hands out (apps' ports,
# helpers' status ports) are never another's.
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
GRID_HOSTS = (f"127.0.{WORKER}.2", f"127.0.{WORKER}.3")

# A small or full filesystem for a grid is a tmpfs, which only root can mount (CI runs as root).
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a small filesystem is a tmpfs only root can mount")

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


class DockerEngines:
    """Two real Docker engines (see migrations_app/engines.py) with MIG's image in each, made
    in the background from the moment the tests that need them are collected: building the
    image (minutes, the first time) overlaps the tests that need no engine."""

    def __init__(self):
        self.engines = []
        self.error = None
        self.thread = threading.Thread(target=self.start, name="docker-engines", daemon=True)
        self.thread.start()

    def start(self):
        from migrations_app.engines import load_image, start_engine

        try:
            for number in range(2):
                self.engines.append(start_engine(str(number)))
            load_image(self.engines, DOCKER_IMAGE)
        except Exception as error:  # the tests that need the engines fail with it
            self.error = error

    def ready(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.engines

    def stop(self):
        self.thread.join()
        while self.engines:
            self.engines.pop().stop()


DOCKER_ENGINES = []


# The modules whose tests take longest, longest first: run first, two workers finish the
# suite together instead of one waiting while the other runs a long test at the end.
SLOW_FIRST = ["test_bench", "test_docker", "test_browser", "test_faults", "test_snapshots", "test_guide"]


def pytest_collection_modifyitems(session, config, items):
    def weight(item):
        module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
        return SLOW_FIRST.index(module) if module in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=weight)  # stable: the order within each module stays


def pytest_collection_finish(session):
    if any("docker_engines" in getattr(item, "fixturenames", ()) for item in session.items):
        DOCKER_ENGINES.append(DockerEngines())


def pytest_sessionfinish(session, exitstatus):
    for engines in DOCKER_ENGINES:  # made, whether or not this worker's tests used them
        engines.stop()


@pytest.fixture(scope="session")
def docker_engines():
    """Two real Docker engines, with MIG's image in each (see DockerEngines)."""
    if not DOCKER_ENGINES:  # collected by a route the hook did not see
        DOCKER_ENGINES.append(DockerEngines())
    return DOCKER_ENGINES[0].ready()


# MIG's image in the tests' engines.
DOCKER_IMAGE = "mig:test"


def docker_table(engine, host_index=0, ssh_hosts=None, app_port=8080):
    """A [grids.NAME] table for a docker grid on `engine`, reached locally or over ssh."""
    address = GRID_HOSTS[host_index]
    lines = ['driver = "docker"', f'image = "{DOCKER_IMAGE}"', f'docker_socket = "{engine.socket}"']
    if ssh_hosts is None:
        lines.append('transport = "local"')
    else:
        host = ssh_hosts[host_index]
        lines += [
            'transport = "ssh"',
            f'host = "{host.address}"',
            f"port = {host.port}",
            f'user = "{host.user}"',
            f'host_key = "{host.host_key}"',
        ]
    lines.append(f'app_url = "http://{address}:{app_port}/"')
    return "\n".join(lines) + "\n"


def remove_docker_grid(engine, name, keep_grid=False):
    """Whatever a docker grid left on its engine: its apps' containers and volumes, and,
    unless `keep_grid` (the next test's grid of that name is then made at once), its own."""
    only_apps = ["--filter", "label=mig.app"] if keep_grid else []
    for kind in ("container", "volume"):
        found = engine.docker(kind, "ls", "-q", *(["-a"] if kind == "container" else []),
                              "--filter", f"label=mig.grid={name}", *only_apps).stdout.split()  # fmt: skip
        if found:
            engine.docker(kind, "rm", "-f", *found, check=False)


def any_grid_table(request, kind, tmp_path, host_index=0, app_port=8080):
    """The table of a grid of `kind` ("DRIVER-TRANSPORT"), and what removes it at the end."""
    driver, transport = kind.split("-")
    hosts = request.getfixturevalue("ssh_hosts") if transport == "ssh" else None
    if driver == "hostgrid":
        table = grid_table(transport, tmp_path / f"grid{host_index}", hosts, host_index, app_port)
        return table, lambda name: None
    engine = request.getfixturevalue("docker_engines")[host_index]
    table = docker_table(engine, host_index, hosts, app_port)
    return table, lambda name: remove_docker_grid(engine, name, keep_grid=True)


GRID_KINDS = ["hostgrid-local", "hostgrid-ssh", "docker-local", "docker-ssh"]


def fresh_grid(table, client_key, remove=lambda name: None, templates=True):
    """The grid `east` of `table`, initialised (with the `web` template), for one test; at
    the end its apps are destroyed, and `remove(name)` clears what is left."""
    driver = open_grid(gridinfo.parse("[grids.east]\n" + table)["east"], client_key)
    try:
        driver.init()
        if templates:
            driver.install_template("web", WEB_TEMPLATE, "1")
        yield driver
        for app in driver.list_apps():
            driver.destroy(app.name)
    finally:
        driver.close()
        remove("east")


@pytest.fixture(params=GRID_KINDS)
def any_grid(request, tmp_path, client_key):
    """A fresh, initialised grid with a `web` template, of each driver, over each transport:
    what the driver contract's tests run on."""
    table, remove = any_grid_table(request, request.param, tmp_path)
    yield from fresh_grid(table, client_key, remove)


@pytest.fixture(params=GRID_KINDS)
def any_ported(request, tmp_path, client_key):
    """A fresh grid whose apps each answer on a port of their own, of each driver, over each
    transport."""
    table, remove = any_grid_table(request, request.param, tmp_path)
    # A few ports: enough for any test's apps, and soon used up by the one that runs out.
    table = table.replace(":8080/", ":{port}/") + f"app_ports = {port_range(GRID_HOSTS[0], size=6)}\n"
    yield from fresh_grid(table, client_key, remove, templates=False)


@pytest.fixture(params=["local", "ssh"])
def grid(request, tmp_path, client_key):
    """A fresh, initialised hostgrid grid with a `web` template, over each transport."""
    hosts = request.getfixturevalue("ssh_hosts") if request.param == "ssh" else None
    yield from fresh_grid(grid_table(request.param, tmp_path / "east", hosts), client_key)


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
    yield from fresh_grid(table, client_key, templates=False)


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
