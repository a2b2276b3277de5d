"""`manage.py demo`: Ctrl-C at any moment leaves nothing it started running.

The whole demo, served and driven in a browser, is tested in test_browser.py.
"""

import subprocess
import sys

import pytest

from migrations_app.grids import AppState, gridinfo, open_grid

from .conftest import ROOT, ctrl_c, mig_env, popen_demo, said_until
from .sshd import free_port


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["from-a-terminal", "as-a-background-job"])
def test_ctrl_c_while_the_demo_sets_up_stops_the_app_it_started(tmp_path, sigint_ignored):
    # A background job of a script inherits SIGINT ignored: the demo still takes Ctrl-C.
    demo = popen_demo(tmp_path, free_port("127.0.0.1"), sigint_ignored=sigint_ignored)
    try:
        # The app is provisioned and starting; MIG in it is not answering yet, or is just
        # beginning to: either way the demo has something to stop.
        said = said_until(demo, "Waiting for MIG")
        assert "Waiting for MIG in east/shop" in said, said
    finally:
        rest = ctrl_c(demo)
    assert demo.returncode == 0, rest
    assert "Traceback" not in rest, rest
    assert "stopped east/shop" in rest and "stopped; run `./dev demo` again to resume" in rest, rest
    east = open_grid(gridinfo.parse((tmp_path / "demo" / "grid.info").read_text())["east"], "")
    try:
        assert east.state("shop") == AppState.STOPPED
    finally:
        east.close()


def test_a_stop_signal_wakes_the_demo_at_once(tmp_path):
    # In a process of its own, as the handlers are the process's. The signal comes from
    # another process, as Ctrl-C does, once the demo waits (its main thread asleep in the
    # select, as the kernel's wchan says; where it says nothing, after 10 s): it sets the
    # flag and ends the wait. A wait the signal did not wake would take its hour, and the
    # run time out.
    asleep = "for i in $(seq 1000); do grep -q poll_schedule /proc/$0/wchan && break; sleep 0.01; done"
    code = (
        "import os, subprocess\n"
        "from migrations_app.management.commands.demo import StopSignals\n"
        "stop = StopSignals()\n"
        "print('before', stop.wait(0))\n"
        f"subprocess.Popen(['sh', '-c', '{asleep}; kill -TERM $0', str(os.getpid())])\n"
        "print('woken', stop.wait(3600))\n"
        "print('after', stop.wait(3600))\n"
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=mig_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.splitlines()[-3:] == ["before False", "woken True", "after True"], result
