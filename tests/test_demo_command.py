"""`manage.py demo`: Ctrl-C at any moment leaves nothing it started running.

The whole demo, served and driven in a browser, is tested in test_browser.py.
"""

import signal
import subprocess
import sys

from migrations_app.grids import AppState, gridinfo, open_grid

from .conftest import ROOT, mig_env
from .sshd import free_port


def test_ctrl_c_while_the_demo_sets_up_stops_the_app_it_started(tmp_path):
    port = free_port("127.0.0.1")
    demo = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--dir", str(tmp_path / "demo"), "--port", str(port)],
        cwd=ROOT,
        env=mig_env(tmp_path / "config"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    said = []
    try:
        for line in demo.stdout:
            said.append(line)
            # The app is provisioned and starting; MIG in it is not answering yet, or is
            # just beginning to: either way the demo has something to stop.
            if "Waiting for MIG" in line:
                break
        assert "Waiting for MIG in east/shop" in "".join(said), "".join(said)
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=120)
    assert demo.returncode == 0, rest
    assert "Traceback" not in rest, rest
    assert "stopped east/shop" in rest and "stopped; run `./dev demo` again to resume" in rest, rest
    east = open_grid(gridinfo.parse((tmp_path / "demo" / "grid.info").read_text())["east"], "")
    try:
        assert east.state("shop") == AppState.STOPPED
    finally:
        east.close()
