"""The packages that run on grid hosts: the helper and the agent run with what a grid host
has, and the agent is one file."""

import subprocess
import sys
import zipfile

from migrations_app.grids import hostgrid

from .conftest import ROOT
from .sshd import GRID_PYTHON

# Imports every module of grids/ and helper/ (not the __main__ ones, which run) in an
# interpreter where Django and paramiko cannot be imported, as on a grid host.
WITHOUT_DJANGO_OR_PARAMIKO = """
import importlib, pkgutil, sys

class NotOnAGridHost:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("django", "paramiko"):
            raise ImportError(f"{name} is not installed on a grid host")

sys.meta_path.insert(0, NotOnAGridHost())
import migrations_app.grids, migrations_app.helper
for package in (migrations_app.grids, migrations_app.helper):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
            print(module.name)
"""


def test_grids_and_helper_import_with_neither_django_nor_paramiko():
    argv = [sys.executable, "-c", WITHOUT_DJANGO_OR_PARAMIKO]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split())
    for module in ("grids.transport", "grids.hostgrid", "grids.agent.tree", "helper.run", "helper.sync"):
        assert f"migrations_app.{module}" in imported


def test_the_agent_is_one_file_that_runs_its_operations(tmp_path):
    archive = tmp_path / "agent.pyz"
    archive.write_bytes(hostgrid.agent_archive())
    with zipfile.ZipFile(archive) as zipped:
        names = set(zipped.namelist())
    assert {"__main__.py", "agent/ops.py", "agent/tree.py", "agent/cutover.py", "agent/ops.pyc"} <= names
    # Built the same way by every process (its bytecode too): its version names its content.
    build = "from migrations_app.grids import hostgrid; print(hostgrid.agent_version())"
    other = subprocess.run(
        [sys.executable, "-c", build], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert other.stdout.strip() == hostgrid.agent_version(), other.stderr
    root = tmp_path / "grid"
    run = [GRID_PYTHON, "-I", str(archive), str(root)]  # -I: nothing of this checkout on its path
    assert subprocess.run([*run, "init", "--name", "g"], capture_output=True, timeout=60).returncode == 0
    result = subprocess.run([*run, "info"], capture_output=True, text=True, timeout=60)
    assert '"ok": true' in result.stdout and '"name": "g"' in result.stdout, result


def loaded_from(archive, module="agent.ops"):
    code = f"import sys; sys.path.insert(0, {str(archive)!r}); import {module}; print({module}.__file__)"
    result = subprocess.run([GRID_PYTHON, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_agent_starts_from_its_bytecode_and_any_other_python_from_its_source(tmp_path):
    archive = tmp_path / "agent.pyz"
    archive.write_bytes(hostgrid.agent_archive())
    assert loaded_from(archive) == f"{archive}/agent/ops.pyc"
    # Another Python's bytecode has another magic number: the source is compiled instead.
    other = tmp_path / "other-python.pyz"
    with zipfile.ZipFile(archive) as built, zipfile.ZipFile(other, "w") as rebuilt:
        for info in built.infolist():
            data = built.read(info)
            rebuilt.writestr(info, b"\0\0\r\n" + data[4:] if info.filename.endswith(".pyc") else data)
    assert loaded_from(other) == f"{other}/agent/ops.py"
    result = subprocess.run(
        [GRID_PYTHON, "-I", str(other), str(tmp_path / "grid"), "init", "--name", "g"], capture_output=True
    )
    assert result.returncode == 0, result.stderr
