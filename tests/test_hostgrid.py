"""The hostgrid driver, over the local transport and over a real OpenSSH server."""

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from migrations_app import catalog
from migrations_app.grids import AppExists, AppNotFound, AppState, GridError, InvalidName, OperationFailed
from migrations_app.grids.agent import tree
from migrations_app.grids.errors import CommandTimeout

from .conftest import GRID_HOSTS
from .sshd import GRID_PYTHON

BAD_NAMES = ["x; rm -rf /", "$(id)", "../etc", "a b", "", "a" * 200, "-rf", "1abc", "é"]


def fetch(port, path="index.html", timeout=2):
    with urllib.request.urlopen(f"http://{GRID_HOSTS[0]}:{port}/{path}", timeout=timeout) as r:
        return r.read().decode()


def answers(port):
    try:
        fetch(port, timeout=0.5)
    except OSError:
        return False
    return True


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def process_gone(pid):
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def provision_web(grid, name, port):
    grid.provision(name, "web", {"port": str(port), "bind": GRID_HOSTS[0]})
    assert wait_for(lambda: answers(port)), "the component never answered"


def component_pid(grid, app):
    return grid.describe(app, sizes=False).components[0].pid


def test_lifecycle(grid, web_port):
    provision_web(grid, "shop", web_port)
    assert fetch(web_port) == "hello from the catalog\n"
    assert grid.state("shop") == AppState.RUNNING
    assert grid.exists("shop") and not grid.exists("nothere")

    app = grid.describe("shop")
    assert [c.name for c in app.components] == ["http"]
    assert [(v.name, v.bytes, v.files) for v in app.volumes] == [("www", 23, 1), ("data", 0, 0)]
    assert app.manifest["properties"] == {"port": str(web_port), "bind": GRID_HOSTS[0], "greeting": "hello"}

    # The grid tells every component where it runs.
    environ = Path(f"/proc/{app.components[0].pid}/environ").read_bytes().split(b"\0")
    assert b"MIG_GRID=east" in environ and b"MIG_APP=shop" in environ

    grid.stop("shop")
    assert grid.state("shop") == AppState.STOPPED
    assert not answers(web_port)
    grid.start("shop")
    assert grid.state("shop") == AppState.RUNNING
    assert wait_for(lambda: answers(web_port))

    grid.define("copy", app.manifest)
    copy = grid.describe("copy")
    assert copy.state == AppState.STOPPED
    assert copy.manifest["components"] == app.manifest["components"]
    assert [(v.name, v.bytes) for v in copy.volumes] == [("www", 0), ("data", 0)]
    assert {a.name: a.state for a in grid.list_apps()} == {"copy": "stopped", "shop": "running"}

    pid = component_pid(grid, "shop")
    assert grid.destroy("shop") == {"existed": True, "leftovers": [], "kept": False}
    assert not answers(web_port)
    assert process_gone(pid)
    assert not grid.exists("shop")
    assert grid.destroy("shop")["existed"] is False  # idempotent
    with pytest.raises(AppNotFound):
        grid.state("shop")


def test_component_outlives_the_connection(grid, web_port):
    provision_web(grid, "shop", web_port)
    grid.close()
    time.sleep(0.3)
    assert answers(web_port)
    assert grid.state("shop") == AppState.RUNNING  # reconnects


def test_dead_component_is_not_running(grid, web_port):
    provision_web(grid, "shop", web_port)
    os.kill(component_pid(grid, "shop"), signal.SIGKILL)
    assert wait_for(lambda: grid.state("shop") == AppState.FAILED)
    grid.start("shop")
    assert wait_for(lambda: answers(web_port))


def test_stale_pid_file_with_reused_pid_is_not_running(grid, web_port):
    provision_web(grid, "shop", web_port)
    grid.stop("shop")
    pidfile = Path(grid.grid.root, "apps/shop/run/http.pid")
    # A pid file naming a live but unrelated process (this test) must not count.
    pidfile.write_text(f"{os.getpid()} 0\n")
    Path(grid.grid.root, "apps/shop/state.json").write_text('{"desired": "running"}')
    assert grid.state("shop") == AppState.FAILED


def test_stop_never_kills_unless_forced(grid, web_port, tmp_path):
    stubborn = {
        "volumes": [],
        "stop_grace": 0.5,
        "start_settle": 0.2,
        "components": [
            {
                "name": "stubborn",
                "command": [
                    "{python}",
                    "-c",
                    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
                ],
            }
        ],
    }
    grid.define("stubborn", stubborn)
    grid.start("stubborn")
    with pytest.raises(OperationFailed, match=r"did not stop within 0.5s of SIGTERM: stubborn \(pid \d+\)"):
        grid.stop("stubborn")
    assert grid.state("stubborn") == AppState.RUNNING
    grid.stop("stubborn", grace=0.2, force=True)
    assert grid.state("stubborn") == AppState.STOPPED


def test_stop_reaches_what_a_component_spawned(grid):
    grid.define(
        "forker",
        {
            "volumes": ["data"],
            "start_settle": 0.2,
            "components": [
                {
                    "name": "shell",
                    "command": ["sh", "-c", "sleep 600 & echo $! > {volume:data}/child; wait"],
                }
            ],
        },
    )
    grid.start("forker")
    child_file = Path(grid.grid.root, "apps/forker/volumes/data/child")
    assert wait_for(child_file.exists)
    child = int(child_file.read_text())
    grid.stop("forker")
    assert wait_for(
        lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
    )


def test_failed_start_reports_the_log(grid):
    grid.define(
        "broken",
        {
            "volumes": [],
            "components": [{"name": "main", "command": ["sh", "-c", "echo cannot bind port >&2; exit 3"]}],
        },
    )
    with pytest.raises(
        OperationFailed, match="component 'main' exited at start with status 3: .*cannot bind port"
    ):
        grid.start("broken")
    assert grid.state("broken") == AppState.FAILED


def listener_app(grid, name, delay):
    """An app that starts listening on its port after `delay` seconds, and says it needs 30 s."""
    code = (
        "import socket, sys, time; time.sleep(float(sys.argv[2])); s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(({GRID_HOSTS[0]!r}, int(sys.argv[1]))); s.listen(); time.sleep(600)"
    )
    grid.define(
        name,
        {
            "volumes": [],
            "start_settle": 30,
            "components": [{"name": "main", "command": ["{python}", "-c", code, "{app_port}", str(delay)]}],
        },
    )


def test_start_ends_once_the_app_listens(ported):
    listener_app(ported, "server", delay=0.5)
    started = time.monotonic()
    result = ported.start("server", listen=True, timeout=20)
    assert result["listening"] is True
    assert 0.5 <= time.monotonic() - started < 10  # not the 30 s settle time
    assert ported.state("server") == AppState.RUNNING


def test_start_reports_an_app_that_does_not_listen(ported):
    listener_app(ported, "quiet", delay=600)
    result = ported.start("quiet", listen=True, timeout=0.5)
    assert result["listening"] is False
    assert ported.state("quiet") == AppState.RUNNING  # reported, not stopped: a proxy may front it


def test_each_app_gets_a_port_of_its_own(ported):
    low, high = ported.grid.app_ports
    env_dump = (
        "import json, os, sys; "
        "json.dump({k: v for k, v in os.environ.items() if k.startswith('MIG_')}, open(sys.argv[1], 'w')); "
        "import time; time.sleep(600)"
    )
    component = {"name": "main", "command": ["{python}", "-c", env_dump, "{volume:x}/env"]}
    manifest = {"volumes": ["x"], "components": [component]}
    urls = []
    for name in ("one", "two", "three"):
        # A copy's manifest carries its source's port: the grid gives the copy one of its own.
        ported.define(name, {**manifest, "port": low})
        urls.append(ported.describe(name, sizes=False).url)
    ports = [int(url.rsplit(":", 1)[1].strip("/")) for url in urls]
    assert len(set(ports)) == 3 and all(low <= p <= high for p in ports), urls
    assert urls[0] == f"http://{GRID_HOSTS[0]}:{ports[0]}/"
    # What the app's components are told is its own URL.
    ported.start("two")
    env_file = Path(ported.describe("two").volumes[0].path) / "env"
    assert wait_for(lambda: env_file.exists() and env_file.read_text().endswith("}"))
    env = json.loads(env_file.read_text())
    assert (env["MIG_APP"], env["MIG_APP_URL"]) == ("two", urls[1])
    # A port freed by a destroyed app goes to the next one; a port something holds is skipped.
    ported.destroy("one")
    with socket.socket() as holder:
        holder.bind((GRID_HOSTS[0], ports[0]))
        ported.define("four", manifest)
        assert ported.describe("four", sizes=False).url != urls[0]


def test_a_grid_out_of_ports_says_so(ported):
    low, high = ported.grid.app_ports
    with pytest.raises(OperationFailed, match=f"no free port left in this grid's app_ports {low}-{high}"):
        for i in range(high - low + 2):
            ported.define(f"app{i}", {"volumes": [], "components": []})


def test_one_serving_agent_answers_many_operations(grid, web_port):
    provision_web(grid, "shop", web_port)
    session = grid._session
    for _ in range(3):
        assert grid.state("shop") == AppState.RUNNING
    with pytest.raises(AppNotFound):
        grid.state("nothere")
    assert grid._session is session and session.proc.poll() is None  # an error ends nothing


def test_an_agent_that_ended_is_replaced(grid, web_port):
    provision_web(grid, "shop", web_port)
    grid._session.proc.kill()  # as a dropped connection would
    grid._session.proc.wait()
    assert grid.state("shop") == AppState.RUNNING


def test_an_operation_that_takes_too_long_times_out(ported):
    listener_app(ported, "slow", delay=600)
    with pytest.raises(CommandTimeout, match="start did not finish in 0.5s"):
        ported._call("start", "slow", "--listen", "--timeout", "3", timeout=0.5)
    assert ported.state("slow") in (AppState.STARTING, AppState.RUNNING)  # a new agent answers


def test_requests_the_agent_cannot_take_are_answered(grid):
    for request, message in [
        (["scan", "x"], "scan cannot be asked of a serving agent"),
        (["serve"], "serve cannot be asked of a serving agent"),
        (["info", "--help"], "unrecognized arguments: --help"),
        (["bogus"], "invalid choice: 'bogus'"),
    ]:
        with pytest.raises(OperationFailed, match=message):
            grid._call(*request)
    assert grid.info().initialised


def test_scan_streams_over_every_transport(grid, web_port):
    provision_web(grid, "shop", web_port)
    proc = grid.open_scan("shop", hashes=True)
    entries = list(tree.entries(proc, "listing"))
    page = next(e for e in entries if e.path == "www/index.html")
    assert (page.kind, page.size, len(page.blocks)) == ("f", 23, 16)


def test_a_provisioned_app_is_removed_only_by_its_owner(grid, web_port):
    # Two processes may finish one job; the late one must not remove the next job's helper,
    # which has the same name.
    grid.provision("helper", "web", {"port": str(web_port), "bind": GRID_HOSTS[0]}, owner="mig-job:next")
    assert grid.describe("helper", sizes=False).manifest["owner"] == "mig-job:next"
    assert grid.destroy("helper", owner="mig-job:ended")["kept"] is True
    assert grid.state("helper") == AppState.RUNNING
    assert grid.destroy("helper", owner="mig-job:next")["kept"] is False
    assert not grid.exists("helper")


def test_provision_checks_template_and_properties(grid):
    with pytest.raises(OperationFailed, match="template 'nope' is not in this grid's catalog"):
        grid.provision("x", "nope")
    with pytest.raises(OperationFailed, match=r"has no property 'colour' \(known: bind, greeting, port\)"):
        grid.provision("x", "web", {"colour": "red"})
    with pytest.raises(OperationFailed, match="needs properties: bind, port"):
        grid.provision("x", "web")
    assert grid.list_apps() == []


def test_provision_refuses_existing_app(grid, web_port):
    provision_web(grid, "shop", web_port)
    with pytest.raises(AppExists):
        grid.provision("shop", "web", {"port": "1", "bind": GRID_HOSTS[0]})
    assert answers(web_port)


def test_secrets_are_private_files(grid, web_port):
    grid.provision("shop", "web", {"port": str(web_port), "bind": GRID_HOSTS[0]}, secrets={"token": b"t0k3n"})
    secret = Path(grid.grid.root, "apps/shop/secrets/token")
    assert secret.read_bytes() == b"t0k3n"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert Path(grid.grid.root, "apps/shop/secrets").stat().st_mode & 0o777 == 0o700


def test_read_and_follow_files(grid):
    grid.define(
        "writer",
        {
            "volumes": ["work"],
            "start_settle": 0.1,
            "components": [
                {
                    "name": "w",
                    "command": [
                        "sh",
                        "-c",
                        "for i in 1 2 3; do echo line$i >> {volume:work}/log; sleep 0.2; done; sleep 0.3",
                    ],
                }
            ],
        },
    )
    grid.start("writer")
    assert list(grid.follow("writer", "volumes/work/log")) == ["line1", "line2", "line3"]
    text, offset = grid.read_file("writer", "volumes/work/log", offset=6)
    assert text == "line2\nline3\n" and offset == 18
    assert grid.read_file("writer", "volumes/work/missing") == ("", 0)


@pytest.mark.parametrize("path", ["../other/app.json", "/etc/passwd", "volumes/../../x", ""])
def test_paths_stay_inside_the_app(grid, path):
    grid.define("box", {"volumes": [], "components": []})
    with pytest.raises(InvalidName):
        grid.read_file("box", path)


def test_a_symlink_in_an_app_is_not_read_through(grid, tmp_path):
    grid.define("box", {"volumes": ["data"], "components": []})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not the app's\n")
    data = Path(grid.grid.root, "apps/box/volumes/data")
    (data / "file").symlink_to(outside / "secret")
    (data / "dir").symlink_to(outside)
    assert grid.read_file("box", "volumes/data/file") == ("", 0)
    assert grid.read_file("box", "volumes/data/dir/secret") == ("", 0)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_before_any_command(grid, name, monkeypatch):
    before = sorted(p.name for p in Path(grid.grid.root, "apps").iterdir())
    commands = []
    # A spy on the real transport: it records what would run, and still runs it.
    for method in ("run", "popen"):
        real = getattr(grid.transport, method)

        def spy(argv, real=real, **kwargs):
            commands.append(argv)
            return real(argv, **kwargs)

        monkeypatch.setattr(grid.transport, method, spy)
    operations = [
        lambda: grid.state(name),
        lambda: grid.start(name),
        lambda: grid.stop(name),
        lambda: grid.destroy(name),
        lambda: grid.describe(name),
        lambda: grid.define(name, {"volumes": [], "components": []}),
        lambda: grid.provision(name, "web", {"port": "1"}),
        lambda: grid.provision("ok", "web", {name: "1"}),
        lambda: grid.open_scan(name, hashes=True),
        lambda: grid.open_delta(name),
    ]
    for operation in operations:
        with pytest.raises(InvalidName, match="invalid"):
            operation()
    assert commands == []
    assert sorted(p.name for p in Path(grid.grid.root, "apps").iterdir()) == before


def test_init_refuses_a_root_that_is_another_grid(grid):
    Path(grid.grid.root, "grid.json").write_text(json.dumps({"name": "west"}))
    with pytest.raises(GridError, match="already grid 'west'; refusing to call it 'east'"):
        grid.init()


def test_info_reports_the_grid(grid):
    info = grid.info()
    assert info.name == "east" and info.initialised and info.writable and info.rsync
    assert info.free_bytes > 0 and info.apps == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a full disk is a tmpfs mounted by root")
def test_a_template_that_does_not_fit_says_disk_full(tmp_path, client_key):
    import subprocess

    from migrations_app.grids import gridinfo, open_grid

    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        table = f'driver = "hostgrid"\ntransport = "local"\nroot = "{root}"\npython = "{GRID_PYTHON}"\n'
        with open_grid(gridinfo.parse("[grids.tiny]\n" + table)["tiny"], client_key) as grid:
            grid.init()
            files, version = catalog.helper_template()
            with pytest.raises(
                OperationFailed, match=r"disk full on tiny: \d+ bytes free .* MigHelper template"
            ):
                grid.ensure_template("MigHelper", files, version)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
