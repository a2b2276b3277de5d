"""The hostgrid driver, over the local transport and over a real OpenSSH server."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from migrations_app import catalog
from migrations_app.grids import AppNotFound, AppState, GridError, OperationFailed
from migrations_app.grids.errors import CommandTimeout

from .conftest import GRID_HOSTS, needs_root
from .sshd import GRID_PYTHON
from .test_driver_contract import answers, listener_app, provision_web, wait_for


def process_gone(pid):
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def component_pid(grid, app):
    return grid.describe(app, sizes=False).components[0].pid


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


def test_one_serving_agent_answers_many_operations(grid, web_port):
    provision_web(grid, "shop", web_port)
    session = grid._sessions[None]
    for _ in range(3):
        assert grid.state("shop") == AppState.RUNNING
    with pytest.raises(AppNotFound):
        grid.state("nothere")
    assert grid._sessions[None] is session and session.proc.poll() is None  # an error ends nothing


def test_an_agent_that_ended_is_replaced(grid, web_port):
    provision_web(grid, "shop", web_port)
    grid._sessions[None].proc.kill()  # as a dropped connection would
    grid._sessions[None].proc.wait()
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


def test_secrets_are_private_files(grid, web_port):
    grid.provision("shop", "web", {"port": str(web_port), "bind": GRID_HOSTS[0]}, secrets={"token": b"t0k3n"})
    secret = Path(grid.grid.root, "apps/shop/secrets/token")
    assert secret.read_bytes() == b"t0k3n"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert Path(grid.grid.root, "apps/shop/secrets").stat().st_mode & 0o777 == 0o700


def test_init_refuses_a_root_that_is_another_grid(grid):
    Path(grid.grid.root, "grid.json").write_text(json.dumps({"name": "west"}))
    with pytest.raises(GridError, match="already grid 'west'; refusing to call it 'east'"):
        grid.init()


@needs_root
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
