"""
Catalog templates MIG installs on grids.

`MigHelper` carries the helper's code (the Django-free packages only). `MigApp` is an app
with MIG inside, used by the demo and the tests: a `mig` component serving this project
from the app's own code volume, with its config volume, and a `data` component writing to
a data volume.
"""

import hashlib
import json
from pathlib import Path

from .helper import protocol

PROJECT = Path(__file__).resolve().parent.parent
HELPER_PACKAGES = ("migrations_app/grids", "migrations_app/helper")
MIG_APP_TEMPLATE = "MigApp"
HELPER_RESTARTS = 3
MIG_APP_PATHS = ("manage.py", "requirements.txt", "migsite", "migrations_app", "templates", "conf")


def read_tree(paths):
    """{relative path: bytes} of the project's files under `paths` (no caches, no tests)."""
    files = {}
    for rel in paths:
        path = PROJECT / rel
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in candidates:
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                files[str(file.relative_to(PROJECT))] = file.read_bytes()
    return files


def versioned(files):
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return files, digest.hexdigest()[:16]


def helper_template():
    """(files, version) of the MigHelper template."""
    code = read_tree(["migrations_app/__init__.py", *HELPER_PACKAGES])
    manifest = {
        "properties": {},
        "volumes": ["code", protocol.WORK_VOLUME],
        "start_settle": 0.3,
        # Cleanup after a SIGTERM (destroy the partial target, restart the source) needs time.
        "stop_grace": 60,
        "components": [
            {
                "name": "helper",
                "command": [
                    "{python}",
                    "-m",
                    "migrations_app.helper",
                    "--config",
                    f"{{secret:{protocol.SECRET_CONFIG}}}",
                    "--work",
                    f"{{volume:{protocol.WORK_VOLUME}}}",
                ],
                "cwd": "{volume:code}",
                "env": {"PYTHONDONTWRITEBYTECODE": "1"},
                # A helper that dies is started again, and resumes from its journal.
                "restarts": HELPER_RESTARTS,
            }
        ],
    }
    files = {f"volumes/code/{rel}": data for rel, data in code.items()}
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    return versioned(files)


def mig_app_template(python, data_component=True):
    """(files, version) of the MigApp template: MIG (served by gunicorn) plus a data writer.

    `python` is the interpreter on the grid hosts that has MIG's requirements installed.
    Properties `fail_on_grid` and `ignore_stop` make the data component misbehave, for the
    tests of failed migrations; `churn` makes it rewrite its data at so many bytes per
    second, for the benchmarks; `ack_log` makes it acknowledge each write once it is on
    disk, in a file outside the app (see conf/demo/datawriter.py).
    """
    code = read_tree(MIG_APP_PATHS)
    config = "{volume:config}"
    components = [
        {
            "name": "mig",
            "command": ["{prop:python}", "manage.py", "serve"],
            "cwd": "{volume:code}",
            "env": {
                "MIG_CONFIG_DIR": config,
                "MIG_GRID_INFO_FILE": f"{config}/grid.info",
                "MIG_PRIVATE_KEY_FILE": f"{config}/id_ed25519",
                "PYTHONDONTWRITEBYTECODE": "1",
            },
        }
    ]
    if data_component:
        components.append(
            {
                "name": "data",
                "command": [
                    "{prop:python}",
                    "conf/demo/datawriter.py",
                    "{volume:data}",
                    "{prop:fail_on_grid}",
                    "{prop:ignore_stop}",
                    "{prop:churn}",
                    "{prop:ack_log}",
                ],
                "cwd": "{volume:code}",
            }
        )
    manifest = {
        "properties": {"python": python, "fail_on_grid": "", "ignore_stop": "", "churn": "0", "ack_log": ""},
        "volumes": ["code", "config", "data"],
        "start_settle": 0.5,
        "stop_grace": 5,
        "components": components,
    }
    files = {f"volumes/code/{rel}": data for rel, data in code.items()}
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    return versioned(files)


def env_file(variables):
    """mig.env text: single-quoted values, read literally by django-environ."""
    lines = []
    for key, value in variables.items():
        value = str(value)
        if "'" in value or "\n" in value:
            raise ValueError(f"{key}: quotes and newlines cannot be kept in mig.env")
        lines.append(f"{key}='{value}'\n")
    return "".join(lines)


def provision_mig_app(driver, app, python, grid_info, key=None, env=None, properties=None, start=True):
    """Provision a MigApp on `driver`'s grid, with MIG's config volume filled in.

    `grid_info` is the text of grid.info, `key` the private key's bytes and `env` the
    variables for mig.env (MIG_USERNAME, MIG_PASSWORD, ...): they travel with the app.
    """
    files, version = mig_app_template(python)
    driver.ensure_template(MIG_APP_TEMPLATE, files, version)
    driver.provision(app, MIG_APP_TEMPLATE, {"python": python, **(properties or {})}, start=False)
    driver.put_file(app, "volumes/config/grid.info", grid_info.encode(), 0o644)
    if key is not None:
        driver.put_file(app, "volumes/config/id_ed25519", key, 0o600)
    driver.put_file(app, "volumes/config/mig.env", env_file(env or {}).encode(), 0o600)
    if start:
        driver.start(app)
