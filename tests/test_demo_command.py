"""`manage.py demo`: Ctrl-C at any moment leaves nothing it started running.

The whole demo, served and driven in a browser, is tested in test_browser.py.
"""

import signal

from migrations_app.grids import AppState, gridinfo, open_grid

from .conftest import popen_demo, said_until
from .sshd import free_port


def test_ctrl_c_while_the_demo_sets_up_stops_the_app_it_started(tmp_path):
    demo = popen_demo(tmp_path, free_port("127.0.0.1"))
    try:
        # The app is provisioned and starting; MIG in it is not answering yet, or is just
        # beginning to: either way the demo has something to stop.
        said = said_until(demo, "Waiting for MIG")
        assert "Waiting for MIG in east/shop" in said, said
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
