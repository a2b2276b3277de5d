"""`manage.py serve`: MIG's component command, as its grid starts and stops it."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from io import StringIO

import pytest

from migrations_app import migration
from migrations_app.grids.agent.procs import session_members
from migrations_app.management.commands.serve import Command as Serve
from migrations_app.models import Grid

from .conftest import ROOT, mig_env
from .sshd import free_port
from .test_driver_contract import wait_for
from .test_startup import GRID_INFO


def pings(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def accepted(server_port, client_port):
    """Whether the server side of this loopback connection has been accepted: a socket
    still in the listen backlog has no inode in /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                return inode != 0
    return False


@pytest.fixture
def serving(config_dir):
    """`manage.py serve` as a grid starts it, on a free loopback port: (process, port)."""
    port = free_port("127.0.0.1")
    serve = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "serve"],
        cwd=ROOT,
        env=mig_env(config_dir, MIG_BIND=f"127.0.0.1:{port}", MIG_NO_LOGIN="true"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # as a grid starts a component: its own session
    )
    try:
        assert wait_for(lambda: pings(f"http://127.0.0.1:{port}/ping/"), timeout=60)
        yield serve, port
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()


def test_a_stop_answers_the_request_under_way_then_every_process_ends(serving):
    serve, port = serving
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert wait_for(lambda: accepted(port, client.getsockname()[1]), timeout=60)  # a worker has it
        os.killpg(serve.pid, signal.SIGTERM)  # as a grid stops an app: its whole session
        client.sendall(b"\r\n")
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b'{"ok": true}')
    assert serve.wait(timeout=30) == 0
    assert wait_for(lambda: not session_members(serve.pid), timeout=60)  # every process of it ended
    assert "Shutting down: Master" in serve.stderr.read().decode()


def test_no_connection_is_kept_open_after_its_answer(serving):
    # A stopping worker waits for its kept-alive connections (up to 2 s), and an operator's
    # browser on the job page would hold one: the migration's downtime grew by that much.
    _, port = serving
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/ping/")
    response = connection.getresponse()
    assert response.read() == b'{"ok": true}' and response.getheader("Connection") == "close"
    assert connection.sock is None  # http.client closes it when the server says it will
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"GET /ping/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = b""
        while chunk := raw.recv(65536):  # ends: the server closes it
            reply += chunk
    assert reply.endswith(b'{"ok": true}')


@pytest.mark.parametrize("yielding, raised", [(True, 10), (False, 0)])
def test_a_yielding_background_command_runs_at_a_lower_cpu_priority(settings, tmp_path, yielding, raised):
    # serve runs `startup` beside its web workers, whose first answer ends a migrated app's
    # downtime: it runs at a lower CPU priority (spawn_manage's `yielding`).
    settings.CONFIG_DIR = tmp_path
    (tmp_path / "logs").mkdir()
    said = "import os; print('nice', os.nice(0))"
    assert migration.spawn_manage("shell", "-c", said, new_log=True, yielding=yielding).wait(timeout=60) == 0
    log = (tmp_path / "logs" / "migration.log").read_text()
    assert f"nice {min(os.nice(0) + raised, 19)}\n" in log, log


@pytest.mark.django_db
def test_the_grids_are_recorded_before_mig_answers(settings, tmp_path):
    # The form lists the grids from the table: a browser that came at once once found the
    # list empty, while the background startup had still to record them.
    settings.MIG_GRID_INFO_FILE = tmp_path / "grid.info"
    settings.MIG_GRID_INFO_FILE.write_text(GRID_INFO)
    out = StringIO()
    Serve(stdout=out, stderr=StringIO()).step_prepare()
    assert list(Grid.objects.listed().values_list("name", flat=True)) == ["east", "west"]
    assert "grids added: east, west" in out.getvalue()


@pytest.mark.django_db
def test_a_grid_info_it_cannot_read_leaves_mig_answering_and_saying_why(settings, tmp_path):
    settings.MIG_GRID_INFO_FILE = tmp_path / "grid.info"
    settings.MIG_GRID_INFO_FILE.write_text("[grids.east\n")
    err = StringIO()
    Serve(stdout=StringIO(), stderr=err).step_prepare()
    assert "not valid TOML" in err.getvalue() and "MIG answers without its grids" in err.getvalue()
    assert not Grid.objects.exists()
