"""Apps of containers and named volumes, with MIG inside, moving between two real Docker
engines over real SSH: snapshot, migrate, migrate back, a helper that dies, hostile names.
The app's data component acknowledges each write once it is on disk, over TCP, to a client
here; no acknowledged write may be lost, and never may both engines run the app."""

import json
import os
import signal
import socketserver
import threading

import pytest

from .test_faults import HELPER, PHASES, Watch, assert_nothing_lost, wait_journal
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


def test_an_app_of_containers_is_snapshotted_moved_and_moved_back(docker_world):
    world = docker_world
    provision(world)
    assert wait_for(lambda: world.acks.read_text().count("\n") >= 3), "the app never acknowledged a write"

    snapshot = move(world, "east", "west", "copy", action="snapshot")
    assert world.state("west", "copy") == "stopped" and world.running("east", "shop")
    assert (world.volume("west", "copy", "data") / "journal.log").stat().st_size > 0
    assert "total" in json.loads(snapshot["timings"])  # the downtime, as clients saw it

    move(world, "east", "west", "shop", job=2)
    assert world.state("east", "shop") is None  # the source is gone, with its volumes
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
