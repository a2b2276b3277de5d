"""Shared fixtures: throw-away config volumes, manage.py in a subprocess, grids, sshd."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIG_VARS = ("MIG_CONFIG_DIR", "MIG_USERNAME", "MIG_PASSWORD", "MIG_MODE", "MIG_GRID", "MIG_APP")


def mig_env(config_dir, **extra):
    """An environment for a MIG process on `config_dir`, with nothing inherited from ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIG_") and k != "SECRET_KEY"}
    env["DJANGO_SETTINGS_MODULE"] = "migsite.settings"
    env["MIG_CONFIG_DIR"] = str(config_dir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_manage(config_dir, *args, env=None, timeout=120, check=False):
    """Run `manage.py ARGS` as MIG would be run, in its own process."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=mig_env(config_dir, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def config_dir(tmp_path):
    path = tmp_path / "config"
    path.mkdir()
    return path
