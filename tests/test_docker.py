"""Apps of containers and named volumes, with MIG inside, moving between two real Docker
engines over real SSH: snapshot, migrate, migrate back, a helper that dies, hostile names.
The app's data component acknowledges each write once it is on disk, over TCP, to a client
here; no acknowledged write may be lost, and never may both engines run the app."""

import json
import os
import re
import signal
import socketserver
import subprocess
import sys
import threading

import pytest

from migrations_app.grids import gridinfo, open_grid
from migrations_app.helper import protocol

from .test_faults import HELPER, PHASES, Watch, assert_nothing_lost, settle, wait_journal
from .test_guide import answers
from .world import DockerWorld, wait_for


class Acks(socketserver.ThreadingTCPServer):
    """A client of the app: what it acknowledged, line by line, in a file."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path):
        self.path = path
        path.write_text("")
        self.lock = threading.Lock()

        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for line in self.rfile:
                    with server.lock, open(server.path, "ab") as f:
                        f.write(line)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def read_text(self):
        with self.lock:
            return self.path.read_text()


@pytest.fixture
def docker_world(tmp_path, ssh_hosts, client_key, docker_engines, request):
    world = DockerWorld(tmp_path, ssh_hosts, client_key, docker_engines)
    world.acks = Acks(tmp_path / "acks")
    world.watch = None
    yield world
    world.acks.shutdown()
    if world.watch is not None:
        world.watch.stop()
        print(f"\n{request.node.name}: no engine ran the app for at most {world.watch.longest_neither:.1f}s")
    world.close()
    if world.watch is not None:
        assert not world.watch.both_up, "both copies of the app ran at once"


def provision(world, **kwargs):
    port = world.acks.server_address[1]
    world.provision(properties={"ack_log": f"tcp:127.0.0.1:{port}"}, **kwargs)
    world.watch = Watch(world)


def move(world, source, target, app, action="migrate", job=1):
    # Not --wait: a command run inside the app's container stops with the app.
    result = world.manage(source, "shop", "migrate_app", "--yes", target, app, "--action", action)
    assert result.returncode == 0, result.stdout + result.stderr
    where = target if action == "migrate" else source
    assert wait_for(lambda: world.running(where, "shop"), 60)
    done = world.wait_job(where, "shop", job)
    assert done["state"] == "done", done
    return done


def image_only_on(engine, tag):
    """An image of this app's own, on one engine only: MIG's, with a file added."""
    engine.docker("rm", "-f", "image-maker", check=False)
    engine.docker(
        "run", "--name", "image-maker", "--network", "none", "mig:test", "sh", "-c", "echo 1 > /shop-version"
    )
    engine.docker("commit", "image-maker", tag)
    engine.docker("rm", "-f", "image-maker")
    return engine.docker("image", "inspect", "-f", "{{.Id}}", tag).stdout.strip()


# Three jobs, an image copy among them: 65-90 s on a quiet 2-CPU machine, over the suite's
# 3-minute limit for one test (there for hangs) when both CPUs are busy with other work.
@pytest.mark.timeout(400)
def test_an_app_of_containers_is_snapshotted_moved_and_moved_back(docker_world):
    world = docker_world
    east, west = docker_world.engines["east"], docker_world.engines["west"]
    image = image_only_on(east, "shop-data:1")
    assert west.docker("image", "inspect", "shop-data:1", check=False).returncode != 0
    provision(world, data_image="shop-data:1")
    assert wait_for(lambda: world.acks.read_text().count("\n") >= 3), "the app never acknowledged a write"

    # The plan says the image goes first; the job copies it, and it arrives as itself.
    plan = world.manage("east", "shop", "migrate_app", "--dry-run", "west", "copy", "--action", "snapshot")
    assert "image  shop-data:1" in plan.stdout and "copied to west first" in plan.stdout, plan.stdout
    snapshot = move(world, "east", "west", "copy", action="snapshot")
    assert west.docker("image", "inspect", "-f", "{{.Id}}", "shop-data:1").stdout.strip() == image
    assert world.state("west", "copy") == "stopped" and world.running("east", "shop")
    assert (world.volume("west", "copy", "data") / "journal.log").stat().st_size > 0
    assert "total" in json.loads(snapshot["timings"])  # the downtime, as clients saw it

    move(world, "east", "west", "shop", job=2)
    assert world.state("east", "shop") is None  # the source is gone, with its volumes
    # Its containers were made before the stop: the start only started them.
    messages = [e["message"] for e in world.events("west", "shop", 2)]
    assert "Prepared the start of shop on west: mig, data ready" in messages, messages
    assert world.drivers["west"].describe("shop", sizes=False).url == world.url("west")
    assert_nothing_lost(world)

    move(world, "west", "east", "shop", job=3)
    assert world.state("west", "shop") is None and world.state("west", HELPER) is None
    assert wait_for(lambda: world.acks.read_text().count("east/shop") > 3)
    assert_nothing_lost(world)


def test_a_helper_container_killed_mid_copy_resumes(docker_world):
    """kill -9 the helper's container's first process while it copies: the engine starts the
    container again, and the helper goes on from its journal."""
    world = docker_world
    provision(world, padding=64 << 20)
    args = ["migrate_app", "--yes", "west", "shop", "--action", "migrate", "--bwlimit", "20000"]
    result = world.manage("east", "shop", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_journal(world, PHASES["precopy"])
    os.kill(world.helper_pid("west", HELPER), signal.SIGKILL)
    assert wait_for(lambda: world.running("west", "shop"), 240), "the app never came up on west"
    job = world.wait_job("west", "shop", 1, timeout=120)
    assert job["state"] == "done", job
    assert any(line.get("fact") == "resumed" for line in world.filed_journal("west", "shop", 1))
    assert_nothing_lost(world)


def test_hostile_names_run_nothing_on_an_engine(docker_world):
    world = docker_world
    world.provision()
    before = world.engines["west"].docker("ps", "-aq").stdout
    for name in ["x; docker rm -f $(docker ps -aq)", "../etc", "-rf", "a b", "$(id)", "é"]:
        args = ["migrate_app", "--yes", "--action", "migrate", "--", "west", name]
        result = world.manage("east", "shop", *args)
        assert result.returncode != 0 and "invalid app name" in result.stdout + result.stderr, name
    assert world.engines["west"].docker("ps", "-aq").stdout == before
    assert world.job("east", "shop") is None


def test_a_helper_container_gone_for_good_after_the_stop_is_rolled_back(docker_world):
    """The helper's container dies for good once the source has stopped: the watchdog, in
    the source grid's own container, rolls back once the heartbeat is silent, and restarts
    the source, whose MIG ends the job."""
    world = docker_world
    provision(world)
    env_file = world.volume("east", "shop", "config") / "mig.env"
    # Frozen the moment the source has stopped (a kill there, not in a window after it).
    freeze = f"MIG_HELPER_FREEZE_AFTER='{protocol.SOURCE_STOPPED}'\n"
    env_file.write_text(env_file.read_text() + "MIG_HEARTBEAT_TIMEOUT='3'\n" + freeze)
    result = world.manage("east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_journal(world, lambda line: line.get("fact") == protocol.SOURCE_STOPPED)
    world.kill_helper_app("west", HELPER)
    grid, job = settle(world)
    assert (grid, job["state"]) == ("east", "failed"), job
    assert "rolled back by the watchdog" in job["error"] and "no sign of life" in job["error"]
    assert world.state("west", "shop") is None and world.state("west", HELPER) is None
    assert_nothing_lost(world)


@pytest.mark.django_db
def test_an_app_moves_only_between_grids_of_one_kind(settings, tmp_path):
    from migrations_app.migration import PreflightError, preflight

    path = tmp_path / "grid.info"
    path.write_text(
        f'[grids.east]\ndriver = "docker"\ntransport = "local"\nimage = "mig:1"\n\n'
        f'[grids.west]\ndriver = "hostgrid"\ntransport = "local"\nroot = "{tmp_path / "west"}"\n'
    )
    settings.MIG_GRID_INFO_FILE = path
    settings.MIG_GRID, settings.MIG_APP = "east", "shop"
    with pytest.raises(
        PreflightError, match="east is a docker grid and west a hostgrid grid: an app moves only"
    ):
        preflight("west", "shop", "migrate")


def test_the_readme_puts_mig_in_an_app_on_a_docker_grid(tmp_path, ssh_hosts, client_key, docker_engines):
    """The README's "Docker grids", block by block (with this machine's hosts, engines and
    keys in place of the example's), on the app its "Put MIG in your app" describes."""
    from .conftest import ROOT, mig_env, port_range, remove_docker_grid
    from .test_guide import guide_blocks, run

    readme = (ROOT / "README.md").read_text()
    blocks = {m[1]: m[2] for m in re.finditer(r"<!-- docker:([\w.]+) -->\n```\w*\n(.*?)```", readme, re.S)}
    assert set(blocks) == {"grid.info", "deploy", "inside"}
    work, config = tmp_path / "checkout", tmp_path / "checkout/var/config"
    config.mkdir(parents=True)
    (config / "id_ed25519").write_bytes(client_key.read_bytes())
    os.chmod(config / "id_ed25519", 0o600)
    grid_info = ""
    for name, host, engine in zip(("dock", "dock2"), ssh_hosts, docker_engines, strict=True):
        table = (
            blocks["grid.info"]
            .replace("[grids.dock]", f"[grids.{name}]")
            .replace("203.0.113.12", host.address)
        )
        table = re.sub(r'host_key = "[^"]*"', f'host_key = "{host.host_key}"', table)
        table = table.replace("port = 22", f"port = {host.port}").replace(
            'user = "mig"', f'user = "{host.user}"'
        )
        table = table.replace('"mig:1.0"', '"mig:test"').replace("/var/run/docker.sock", engine.socket)
        grid_info += (
            re.sub(r"app_ports = \[\d+, \d+\]", f"app_ports = {port_range(host.address)}", table) + "\n"
        )
    (config / "grid.info").write_text(grid_info)
    guide = guide_blocks()
    (work / "notes").mkdir()
    (work / "notes/manifest.json").write_text(guide["manifest"])  # as it is: the image has /opt/mig
    env = mig_env(config)
    run(guide["env"], work, env, "the login file")
    try:
        deployed = run(
            blocks["deploy"].replace(".venv/bin/python manage.py", f"{sys.executable} {ROOT}/manage.py"),
            work,
            env,
            "deploy",
        )
        url = re.search(r"MIG answers at (http://\S+): log in as operator", deployed)[1]
        assert url.startswith(f"http://{ssh_hosts[0].address}:")
        inside = blocks["inside"].replace("docker exec", f"docker -H unix://{docker_engines[0].socket} exec")
        moved = run(inside, work, env, "migrate_app inside the app's container")
        assert "destroys: the source app dock/notes" in moved, moved
        dock2 = open_grid(gridinfo.parse(grid_info)["dock2"], client_key)
        try:
            assert wait_for(lambda: dock2.exists("notes") and dock2.state("notes") == "running", 120)
            new_url = dock2.describe("notes", sizes=False).url
            assert wait_for(lambda: answers(new_url), 60)
        finally:
            dock2.close()
        gone = [
            "docker",
            "-H",
            f"unix://{docker_engines[0].socket}",
            "volume",
            "inspect",
            "mig.dock.notes.data",
        ]
        assert wait_for(lambda: subprocess.run(gone, capture_output=True).returncode != 0, 60)
    finally:
        for name, engine in zip(("dock", "dock2"), docker_engines, strict=True):
            remove_docker_grid(engine, name)


def test_the_docker_demo_serves_an_app_and_stops(tmp_path):
    from .conftest import ctrl_c, popen_demo, said_until
    from .sshd import free_port

    port = free_port("127.0.0.1")
    demo = popen_demo(tmp_path, port, "--docker")
    try:
        said = said_until(demo, "MIG runs inside")
        assert f"MIG runs inside east/shop: open http://127.0.0.1:{port}/" in said, said
        assert answers(f"http://127.0.0.1:{port}/")
    finally:
        rest = ctrl_c(demo)
    assert "stopped east/shop" in rest and "stopped the demo's Docker engine" in rest, rest
