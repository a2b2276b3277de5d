"""The helper's rsync command line, run by real rsync."""

import subprocess

from migrations_app.grids.transport import rsync_location
from migrations_app.helper.copy import rsync_argv


def test_an_ipv6_source_reaches_rsync_whole(tmp_path):
    # rsync splits HOST:PATH at the first colon; an IPv6 address must go in brackets. The
    # "remote shell" here runs rsync's server locally and records which host it was asked for.
    shell = tmp_path / "shell"
    shell.write_text('#!/bin/sh\necho "$1" > "$(dirname "$0")/host"\nshift\nexec sh -c "$*"\n')
    shell.chmod(0o755)
    source = tmp_path / "src"
    (source / "data").mkdir(parents=True)
    (source / "data/f").write_text("copied\n")
    (tmp_path / "dst").mkdir()
    assert rsync_location("fd00::5", f"{source}/") == f"[fd00::5]:{source}/"
    argv = rsync_argv(rsync_location("fd00::5", f"{source}/"), f"{tmp_path / 'dst'}/", str(shell))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "host").read_text().strip() == "fd00::5"
    assert (tmp_path / "dst/data/f").read_text() == "copied\n"
