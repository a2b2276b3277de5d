"""The benchmarks still run (tiny data; their targets are for the full size, see bench/)."""

import json
import subprocess
import sys

import pytest

from .conftest import GRID_HOSTS, ROOT


# Every scenario, a dozen migrations and their baselines: 1.5 minutes on a quiet 2-CPU machine,
# over the suite's 3-minute limit for one test on a busy one (the limit is there for hangs).
@pytest.mark.timeout(600)
def test_benchmarks_run_in_smoke_size(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--size", "smoke", "--out", str(out), "--addresses", *GRID_HOSTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: a target missed
    report = json.loads(out.read_text())
    scenarios = {row["scenario"] for row in report["rows"]}
    assert scenarios == {"bulk", "downtime", "tiny", "status", "startup", "memory", "scale"}
    for row in report["rows"]:
        assert row["value"] > 0, row
    # The downtime scenario's job had a budget: the helper predicted its downtime.
    assert any(row["metric"] == "predicted before the stop" for row in report["rows"])
    assert report["machine"]["cpus"] >= 1
    assert "scenario" in result.stdout and "baseline" in result.stdout
