"""The grid contract (grids/driver.py), the same cases on every driver and transport: hostgrid
over local and ssh, docker over a local socket and over ssh. Each case uses only what the
contract promises, and what an app's users see (its answers on the network)."""

import functools
import socket
import subprocess
import time
import urllib.request

import pytest

from migrations_app.grids import (
    AppExists,
    AppNotFound,
    AppState,
    GridError,
    InvalidName,
    OperationFailed,
    open_grid,
)
from migrations_app.grids.agent import tree
from migrations_app.helper.copy import rsync_argv

from .conftest import GRID_HOSTS
from .sshd import free_port

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


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def web_port():
    return free_port(GRID_HOSTS[0])


def provision_web(grid, name, port, **kwargs):
    grid.provision(name, "web", {"port": str(port), "bind": GRID_HOSTS[0]}, **kwargs)
    assert wait_for(lambda: answers(port)), "the component never answered"


def shell_app(grid, name, script, volumes=("data",), **extra):
    """An app of one component running a shell script (placeholders expanded)."""
    component = {"name": "main", "command": ["sh", "-c", script], **extra.pop("component", {})}
    grid.define(name, {"volumes": list(volumes), "start_settle": 0.1, "components": [component], **extra})


def test_lifecycle(any_grid, web_port):
    grid = any_grid
    provision_web(grid, "shop", web_port)
    assert fetch(web_port) == "hello from the catalog\n"
    assert grid.state("shop") == AppState.RUNNING
    assert grid.exists("shop") and not grid.exists("nothere")

    app = grid.describe("shop")
    assert [c.name for c in app.components] == ["http"] and app.components[0].pid
    assert [(v.name, v.bytes, v.files) for v in app.volumes] == [("www", 23, 1), ("data", 0, 0)]
    assert app.manifest["properties"] == {"port": str(web_port), "bind": GRID_HOSTS[0], "greeting": "hello"}
    assert app.url == f"http://{GRID_HOSTS[0]}:8080/"

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

    assert grid.destroy("shop") == {"existed": True, "leftovers": [], "kept": False}
    assert not answers(web_port)
    assert not grid.exists("shop")
    assert grid.destroy("shop")["existed"] is False  # idempotent
    with pytest.raises(AppNotFound):
        grid.state("shop")


def test_components_are_told_where_they_run(any_grid):
    shell_app(any_grid, "shop", 'env | grep "^MIG_" | sort > {volume:data}/env; sleep 600')
    any_grid.start("shop")
    assert wait_for(lambda: any_grid.read_file("shop", "volumes/data/env")[0].count("\n") >= 3)
    text, _ = any_grid.read_file("shop", "volumes/data/env")
    assert text.splitlines() == [
        "MIG_APP=shop",
        f"MIG_APP_URL=http://{GRID_HOSTS[0]}:8080/",
        "MIG_GRID=east",
    ]


def test_a_dead_component_means_a_failed_app(any_grid):
    shell_app(any_grid, "shop", "sleep 0.5; exit 4")
    any_grid.start("shop")
    assert wait_for(lambda: any_grid.state("shop") == AppState.FAILED)
    any_grid.stop("shop")
    assert any_grid.state("shop") == AppState.STOPPED


def test_a_component_with_restarts_is_started_again_when_it_dies(any_grid):
    # Each run appends a line and dies: two restarts allowed, so three runs, then failed.
    shell_app(
        any_grid, "shop", "echo run >> {volume:data}/runs; sleep 0.3; exit 3", component={"restarts": 2}
    )
    any_grid.start("shop")
    assert wait_for(lambda: any_grid.state("shop") == AppState.FAILED, 60)
    assert any_grid.read_file("shop", "volumes/data/runs")[0] == "run\n" * 3


def test_stop_never_kills_unless_forced(any_grid):
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    any_grid.define(
        "stubborn",
        {
            "volumes": [],
            "stop_grace": 0.5,
            "start_settle": 0.2,
            # Without an init in between, the shell passes SIGTERM on to nothing.
            "components": [{"name": "stubborn", "command": ["{python}", "-c", ignore_term]}],
        },
    )
    any_grid.start("stubborn")
    with pytest.raises(OperationFailed, match=r"did not stop within 0.5s of SIGTERM: stubborn \(pid \d+\)"):
        any_grid.stop("stubborn")
    assert any_grid.state("stubborn") == AppState.RUNNING
    any_grid.stop("stubborn", grace=0.2, force=True)
    assert any_grid.state("stubborn") == AppState.STOPPED


def test_failed_start_reports_the_log(any_grid):
    shell_app(any_grid, "broken", "echo cannot bind port >&2; exit 3", volumes=())
    with pytest.raises(
        OperationFailed, match="component 'main' exited at start with status 3: .*cannot bind port"
    ):
        any_grid.start("broken")
    assert any_grid.state("broken") == AppState.FAILED


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


def test_start_ends_once_the_app_listens(any_ported):
    listener_app(any_ported, "server", delay=0.5)
    started = time.monotonic()
    result = any_ported.start("server", listen=True, timeout=20)
    assert result["listening"] is True
    assert 0.5 <= time.monotonic() - started < 10  # not the 30 s settle time
    assert any_ported.state("server") == AppState.RUNNING


def test_start_reports_an_app_that_does_not_listen(any_ported):
    listener_app(any_ported, "quiet", delay=600)
    result = any_ported.start("quiet", listen=True, timeout=0.5)
    assert result["listening"] is False
    assert any_ported.state("quiet") == AppState.RUNNING  # reported, not stopped: a proxy may front it


def test_each_app_gets_a_port_of_its_own(any_ported):
    grid = any_ported
    low, high = grid.grid.app_ports
    env_dump = 'env | grep "^MIG_APP" | sort > {volume:x}/env; sleep 600'
    manifest = {"volumes": ["x"], "components": [{"name": "main", "command": ["sh", "-c", env_dump]}]}
    urls = []
    for name in ("one", "two", "three"):
        # A copy's manifest carries its source's port: the grid gives the copy one of its own.
        grid.define(name, {**manifest, "port": low})
        urls.append(grid.describe(name, sizes=False).url)
    ports = [int(url.rsplit(":", 1)[1].strip("/")) for url in urls]
    assert len(set(ports)) == 3 and all(low <= p <= high for p in ports), urls
    assert urls[0] == f"http://{GRID_HOSTS[0]}:{ports[0]}/"
    # What the app's components are told is its own URL.
    grid.start("two")
    assert wait_for(lambda: grid.read_file("two", "volumes/x/env")[0].count("\n") == 2)
    assert grid.read_file("two", "volumes/x/env")[0] == f"MIG_APP=two\nMIG_APP_URL={urls[1]}\n"
    # A port freed by a destroyed app goes to the next one; a port something holds is skipped.
    grid.destroy("one")
    with socket.socket() as holder:
        holder.bind((GRID_HOSTS[0], ports[0]))
        grid.define("four", manifest)
        assert grid.describe("four", sizes=False).url != urls[0]


def test_a_grid_out_of_ports_says_so(any_ported):
    low, high = any_ported.grid.app_ports
    with pytest.raises(OperationFailed, match=f"no free port left in this grid's app_ports {low}-{high}"):
        for i in range(high - low + 2):
            any_ported.define(f"app{i}", {"volumes": [], "components": []})


def test_a_provisioned_app_is_removed_only_by_its_owner(any_grid, web_port):
    # Two processes may finish one job; the late one must not remove the next job's helper,
    # which has the same name.
    provision_web(any_grid, "helper", web_port, owner="mig-job:next")
    assert any_grid.describe("helper", sizes=False).manifest["owner"] == "mig-job:next"
    assert any_grid.destroy("helper", owner="mig-job:ended")["kept"] is True
    assert any_grid.state("helper") == AppState.RUNNING
    assert any_grid.destroy("helper", owner="mig-job:next")["kept"] is False
    assert not any_grid.exists("helper")


def test_define_records_its_owner(any_grid):
    any_grid.define("shop", {"volumes": [], "components": [], "owner": "someone else"}, owner="mig-job:abc")
    assert any_grid.describe("shop", sizes=False).manifest["owner"] == "mig-job:abc"


def test_provision_checks_template_and_properties(any_grid):
    with pytest.raises(OperationFailed, match="template 'nope' is not in this grid's catalog"):
        any_grid.provision("x", "nope")
    with pytest.raises(OperationFailed, match=r"has no property 'colour' \(known: bind, greeting, port\)"):
        any_grid.provision("x", "web", {"colour": "red"})
    with pytest.raises(OperationFailed, match="needs properties: bind, port"):
        any_grid.provision("x", "web")
    assert any_grid.list_apps() == []


def test_provision_refuses_existing_app(any_grid, web_port):
    provision_web(any_grid, "shop", web_port)
    with pytest.raises(AppExists):
        any_grid.provision("shop", "web", {"port": "1", "bind": GRID_HOSTS[0]})
    assert answers(web_port)


def test_secrets_reach_the_app_and_only_as_files(any_grid):
    shell_app(any_grid, "shop", "cat {secret:token} > {volume:data}/seen; sleep 600")
    any_grid.put_file("shop", "secrets/token", b"t0k3n", 0o600)
    any_grid.start("shop")
    assert wait_for(lambda: any_grid.read_file("shop", "volumes/data/seen")[0] == "t0k3n")


def test_files_are_put_read_and_followed(any_grid):
    any_grid.define("box", {"volumes": ["work"], "components": []})
    any_grid.put_file("box", "volumes/work/deep/dir/note", b"first\n", 0o644)
    assert any_grid.read_file("box", "volumes/work/deep/dir/note") == ("first\n", 6)
    # Larger than a serving agent's request takes: it goes by an agent of its own.
    large = b"0123456789abcdef" * 100_000
    any_grid.put_file("box", "volumes/work/large", large, 0o644)
    chunks, offset = [], 0
    while offset < len(large):
        text, offset = any_grid.read_file("box", "volumes/work/large", offset=offset)
        assert text, f"the read ended at {offset} of {len(large)} bytes"
        chunks.append(text)
    assert "".join(chunks).encode() == large
    shell_app(
        any_grid,
        "writer",
        "for i in 1 2 3; do echo line$i >> {volume:work}/log; sleep 0.2; done; sleep 0.3",
        volumes=("work",),
    )
    any_grid.start("writer")
    assert list(any_grid.follow("writer", "volumes/work/log")) == ["line1", "line2", "line3"]
    text, offset = any_grid.read_file("writer", "volumes/work/log", offset=6)
    assert text == "line2\nline3\n" and offset == 18
    assert any_grid.read_file("writer", "volumes/work/missing") == ("", 0)


def test_paths_stay_inside_the_app(any_grid):
    any_grid.define("box", {"volumes": [], "components": []})
    for path in ["../other/app.json", "/etc/passwd", "volumes/../../x", ""]:
        with pytest.raises(InvalidName):
            any_grid.read_file("box", path)
        with pytest.raises(InvalidName):
            any_grid.put_file("box", path, b"x")


def test_a_symlink_an_app_made_is_not_followed(any_grid):
    # The app links to files outside it; what MIG reads and writes stays inside the app.
    links = "ln -s /etc/hostname {volume:data}/file; ln -s /etc {volume:data}/dir"
    shell_app(any_grid, "box", links + "; echo ok > {volume:data}/ready; sleep 600")
    any_grid.start("box")
    assert wait_for(lambda: any_grid.read_file("box", "volumes/data/ready")[0] == "ok\n")
    assert any_grid.read_file("box", "volumes/data/file") == ("", 0)
    assert any_grid.read_file("box", "volumes/data/dir/hostname") == ("", 0)
    with pytest.raises(OperationFailed):
        any_grid.put_file("box", "volumes/data/dir/written-through", b"x")


def test_bad_names_are_refused_before_any_command(any_grid, monkeypatch):
    before = [a.name for a in any_grid.list_apps()]
    commands = []
    # A spy on the real transport: it records what would run, and still runs it.
    for method in ("run", "popen"):
        real = getattr(any_grid.transport, method)

        def spy(argv, real=real, **kwargs):
            commands.append(argv)
            return real(argv, **kwargs)

        monkeypatch.setattr(any_grid.transport, method, spy)
    grid = any_grid
    for name in BAD_NAMES:
        operations = [
            (grid.state, name),
            (grid.start, name),
            (grid.stop, name),
            (grid.destroy, name),
            (grid.describe, name),
            (grid.define, name, {"volumes": [], "components": []}),
            (grid.provision, name, "web", {"port": "1"}),
            (grid.provision, "ok", "web", {name: "1"}),
            (grid.read_file, name, "volumes/x"),
            (grid.put_file, name, "volumes/x", b""),
            (grid.open_scan, name),
            (grid.open_delta, name),
            (grid.rsync_source, name),
        ]
        if name:  # an empty `reaches` is none
            operations.append((functools.partial(grid.provision, reaches=name), "ok", "web"))
        for operation, *args in operations:
            with pytest.raises(InvalidName, match="invalid"):
                operation(*args)
    assert commands == []
    assert [a.name for a in any_grid.list_apps()] == before


def test_info_reports_the_grid(any_grid):
    info = any_grid.info()
    assert info.name == "east" and info.initialised and info.writable and info.rsync
    assert info.free_bytes > 0 and info.apps == 0
    assert info.problem(any_grid.grid) is None
    assert any_grid.init() is False  # idempotent


def test_the_listing_and_the_deltas_stream(any_grid, web_port):
    provision_web(any_grid, "shop", web_port)
    entries = list(tree.entries(any_grid.open_scan("shop", hashes=True), "listing"))
    page = next(e for e in entries if e.path == "www/index.html")
    assert (page.kind, page.size, len(page.blocks)) == ("f", 23, 16)
    proc = any_grid.open_delta("shop")
    proc.stdin.write(tree.delta_request("www/index.html", b""))
    proc.stdin.write(tree.delta_request("www/nothere", b""))
    proc.stdin.close()
    answers_ = list(tree.read_deltas(proc.stdout))
    assert proc.wait() == 0
    assert answers_[0] == tree.FileStart("www/index.html")
    assert answers_[1] == tree.Block(0, b"hello from the catalog\n")
    assert answers_[2].entry.digest == page.digest
    assert answers_[3] == tree.Gone("www/nothere")


def test_a_survey_lists_then_sweeps_for_what_changed(any_grid):
    # The protocol through each driver; what a sweep finds and leaves out is test_sync's.
    any_grid.define("box", {"volumes": ["work"], "components": []})
    any_grid.put_file("box", "volumes/work/before", b"listed\n", 0o644)
    survey = any_grid.open_scan("box", wait=True, survey=True)
    survey.stdin.write(b"go\n")
    survey.stdin.flush()
    assert [e.path for e in tree.entries(survey, "listing")] == ["work", "work/before"]
    assert survey.poll() is None, "a survey waits for its sweep"
    any_grid.put_file("box", "volumes/work/after", b"new\n", 0o644)
    survey.stdin.write(b'{"sweep": ["work"]}\n')
    survey.stdin.close()
    found = list(tree.swept(survey, "sweeping"))
    assert survey.wait() == 0
    assert {e.path for e in found if isinstance(e, tree.Entry)} >= {"work/after", "work/before"}
    assert tree.Names("work", ["after", "before"]) in found


def test_rsync_reads_an_app_where_the_grid_says(any_grid, web_port, tmp_path, client_key):
    # What the helper does on its target's host: rsync pulls the app's volumes, through the
    # grid's transport as the helper has it (OpenSSH: rsync cannot use paramiko's).
    provision_web(any_grid, "shop", web_port)
    with open_grid(any_grid.grid, client_key, ssh_client="openssh") as helpers_view:
        source = helpers_view.rsync_source("shop")
        (tmp_path / "copy").mkdir()
        argv = rsync_argv(
            source.path, f"{tmp_path}/copy/", source.remote_shell, protect_args=source.protect_args
        )
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "copy/www/index.html").read_text() == "hello from the catalog\n"
    assert (tmp_path / "copy/data").is_dir()


def test_a_prepared_start_runs_nothing_until_the_start(any_grid):
    shell_app(any_grid, "shop", "echo started >> {volume:data}/runs; sleep 600")
    prepared = any_grid.prepare_start("shop", wait=60)
    assert set(prepared.ready) | set(prepared.cold) == {"main"}
    assert all(prepared.cold.values())  # each component started afresh says why
    assert any_grid.state("shop") == AppState.STOPPED
    assert any_grid.read_file("shop", "volumes/data/runs") == ("", 0)
    any_grid.start("shop")
    assert wait_for(lambda: any_grid.read_file("shop", "volumes/data/runs")[0] == "started\n")
    assert any_grid.state("shop") == AppState.RUNNING
    # Preparing a running app prepares nothing, and runs nothing twice.
    assert any_grid.prepare_start("shop").cold == {"main": "it runs already"}
    any_grid.stop("shop")
    assert any_grid.read_file("shop", "volumes/data/runs")[0] == "started\n"


def test_preparing_a_start_needs_the_app(any_grid):
    with pytest.raises(AppNotFound):
        any_grid.prepare_start("ghost")
    with pytest.raises(InvalidName):
        any_grid.prepare_start("$(id)")


def test_an_unknown_app_is_not_found(any_grid):
    for operation in (
        lambda: any_grid.state("ghost"),
        lambda: any_grid.describe("ghost"),
        lambda: any_grid.start("ghost"),
        lambda: any_grid.read_file("ghost", "volumes/x"),
    ):
        with pytest.raises((AppNotFound, GridError)):
            operation()


@pytest.mark.parametrize("kind", ["hostgrid-ssh", "docker-ssh"])
def test_a_host_key_other_than_the_pinned_one_is_refused(request, kind, tmp_path, client_key):
    from migrations_app.grids import HostKeyError, gridinfo

    from .conftest import any_grid_table

    table, _ = any_grid_table(request, kind, tmp_path)
    other = request.getfixturevalue("ssh_hosts")[1].host_key  # the other host's: not this one's
    table = table.replace(request.getfixturevalue("ssh_hosts")[0].host_key, other)
    with open_grid(gridinfo.parse("[grids.east]\n" + table)["east"], client_key) as grid:
        with pytest.raises(HostKeyError, match="HOST KEY MISMATCH: the host offered .* grid.info pins"):
            grid.info()
