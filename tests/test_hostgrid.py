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


# An app whose one component says, as its first act, its pid, whether what the manifest
# preloads was imported before it ran, and its arguments.
REPORTER = """import sys, os, json
preloaded = "http.server" in sys.modules
with open(sys.argv[1] + "/runs", "a") as f:
    f.write(json.dumps([os.getpid(), preloaded, sys.argv[1:], __name__]) + "\\n")
import time
time.sleep(600)
"""


def reporting_app(grid, name="shop", preload=("http.server",), program=("{volume:code}/reporter.py",)):
    component = {
        "name": "main",
        "command": [GRID_PYTHON, *program, "{volume:data}"],
        "cwd": "{volume:code}",
        "preload": list(preload),
    }
    grid.define(name, {"volumes": ["code", "data"], "start_settle": 0.1, "components": [component]})
    grid.put_file(name, "volumes/code/reporter.py", REPORTER.encode())


def runs_of(grid, name="shop"):
    text, _ = grid.read_file(name, "volumes/data/runs")
    return [json.loads(line) for line in text.splitlines()]


def warm_pid(grid, name="shop"):
    return int(Path(grid.grid.root, f"apps/{name}/run/main.warm").read_text().split()[0])


@pytest.mark.parametrize(
    "program", [["{volume:code}/reporter.py"], ["-m", "reporter"]], ids=["script", "module"]
)
def test_a_prepared_start_is_its_waiting_process_told_to_go(grid, program):
    reporting_app(grid, program=program)
    prepared = grid.prepare_start("shop", wait=120)
    assert (prepared.ready, prepared.cold) == (("main",), {})
    waiting = warm_pid(grid)
    assert not process_gone(waiting) and runs_of(grid) == []
    grid.start("shop")
    assert wait_for(lambda: runs_of(grid))
    pid, preloaded, argv, run_name = runs_of(grid)[0]
    data = str(Path(grid.grid.root, "apps/shop/volumes/data"))
    assert (pid, preloaded, argv, run_name) == (waiting, True, [data], "__main__")
    assert component_pid(grid, "shop") == waiting
    text, _ = grid.read_file("shop", "logs/main.log")
    assert f"starting main (its prepared process, pid {waiting})" in text
    grid.stop("shop")
    assert process_gone(waiting)


# Imports two modules of the app's own, and says what they hold and how they were loaded.
IMPORTER = """import sys, json
import same, changed
with open(sys.argv[1] + "/runs", "a") as f:
    f.write(json.dumps([same.VALUE, changed.VALUE, type(same.__loader__).__name__]) + "\\n")
import time
time.sleep(600)
"""


def test_the_apps_code_compiled_ahead_is_taken_only_while_its_file_holds_the_same(grid):
    reporting_app(grid)
    grid.put_file("shop", "volumes/code/reporter.py", IMPORTER.encode())
    grid.put_file("shop", "volumes/code/same.py", b'VALUE = "as prepared"\n')
    grid.put_file("shop", "volumes/code/changed.py", b'VALUE = "the old one"\n')
    # Nothing writes to it: reading it would hold the prepared process up for good.
    os.mkfifo(Path(grid.grid.root, "apps/shop/volumes/code/fifo.py"))
    assert grid.prepare_start("shop", wait=120).ready == ("main",)
    assert wait_for(
        lambda: "compiled 3 Python file(s) of the app ahead\n" in grid.read_file("shop", "logs/main.log")[0]
    )
    # The copy changes a file compiled ahead: same size, and likely within the same second.
    grid.put_file("shop", "volumes/code/changed.py", b'VALUE = "a new one!!"\n')
    grid.start("shop")
    assert wait_for(lambda: runs_of(grid))
    assert runs_of(grid) == [["as prepared", "a new one!!", "CompiledAhead"]]


def test_a_prepared_process_without_time_left_is_not_taken(grid):
    reporting_app(grid)
    # Less than the margin a prepared process must have left (processes.WARM_MARGIN).
    assert grid.prepare_start("shop", wait=4).ready == ("main",)
    waiting = warm_pid(grid)
    grid.start("shop")
    assert wait_for(lambda: runs_of(grid))
    pid, preloaded, _, _ = runs_of(grid)[0]
    assert pid != waiting and not preloaded  # started afresh
    assert wait_for(lambda: process_gone(waiting))
    assert not Path(grid.grid.root, "apps/shop/run/main.warm").exists()


def test_a_module_of_the_apps_own_files_is_never_preloaded(grid):
    reporting_app(grid, preload=["json", "reporter"])
    prepared = grid.prepare_start("shop", wait=120)
    assert prepared.ready == ()
    assert "cannot preload reporter: reporter is one of the app's own files" in prepared.cold["main"]
    assert runs_of(grid) == []  # the app's module was found, not run
    grid.start("shop")
    assert wait_for(lambda: runs_of(grid))
    assert runs_of(grid)[0][1] is False


def test_a_missing_preload_or_another_kind_of_program_starts_cold(grid):
    reporting_app(grid, preload=["no_such_module_here"])
    assert "there is no module no_such_module_here" in grid.prepare_start("shop").cold["main"]
    grid.define(
        "shell",
        {"volumes": [], "components": [{"name": "main", "command": ["sleep", "60"], "preload": ["json"]}]},
    )
    assert "not a Python script or module" in grid.prepare_start("shell").cold["main"]
    grid.define("plain", {"volumes": [], "components": [{"name": "main", "command": [GRID_PYTHON, "x.py"]}]})
    assert grid.prepare_start("plain").cold == {"main": "its manifest names no modules to preload"}


def test_a_destroyed_app_leaves_no_prepared_process(grid):
    reporting_app(grid)
    grid.prepare_start("shop", wait=120)
    waiting = warm_pid(grid)
    grid.destroy("shop")
    assert process_gone(waiting)


def test_bad_preload_lists_are_refused(grid):
    for preload in (["os; rm -rf /"], "json", [1], ["a..b"]):
        with pytest.raises(GridError, match="preload must be a list of Python module names"):
            grid.define(
                "bad", {"volumes": [], "components": [{"name": "m", "command": ["x"], "preload": preload}]}
            )
