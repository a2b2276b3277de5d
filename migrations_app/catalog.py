"""
Catalog templates MIG installs on grids.

`MigHelper` carries the helper's code (the Django-free packages only). `MigApp` is an app
with MIG inside, used by the demo and the tests: a `mig` component serving this project
from the app's own code volume, with its config volume, and a `data` component writing to
a data volume. `app_template` makes a template of an operator's own app (a directory with
a manifest and its volumes' first content) with MIG's code put in, for `manage.py deploy`.

An app carries MIG as the component that runs `manage.py serve`: its working directory
is the volume with MIG's code, and its MIG_CONFIG_DIR the volume MIG keeps its database,
grid.info, key and mig.env in. Both travel with the app.
"""

import hashlib
import json
import re
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
        # MIG waits for the helper's status endpoint, or for its app to fail (provision_helper):
        # a settle time would only add to it.
        "start_settle": 0,
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
                # It drives its grid from inside it (a docker grid's engine).
                "engine": True,
            }
        ],
    }
    files = {f"volumes/code/{rel}": data for rel, data in code.items()}
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    return versioned(files)


# What MIG's component imports ahead of a migration's start (a prepared start, see
# grids/agent/processes.py): Django, gunicorn and the rest that need no settings, about two
# thirds of its imports. MIG's own modules come from the app's files, and stay for the start.
MIG_PRELOAD = (
    "django.core.management",
    "django.core.handlers.wsgi",
    "django.core.wsgi",
    "django.db.backends.sqlite3.base",
    "django.db.models",
    "django.db.migrations.executor",
    "django.contrib.admin",
    "django.contrib.messages.middleware",
    "django.forms",
    "django.middleware.clickjacking",
    "django.middleware.common",
    "django.middleware.security",
    "django.template.loader",
    "gunicorn.app.base",
    "gunicorn.workers.sync",
    "whitenoise.middleware",
    "environ",
)


def mig_app_template(python, data_component=True, engine=False):
    """(files, version) of the MigApp template: MIG (served by gunicorn) plus a data writer.

    `python` is the interpreter on the grid hosts that has MIG's requirements installed.
    `engine`: MIG's component drives its docker grid's engine from inside the app (for grids
    reached through a local socket, as in the docker demo: see README, "Docker grids").
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
            "preload": list(MIG_PRELOAD),
            "env": {
                "MIG_CONFIG_DIR": config,
                "MIG_GRID_INFO_FILE": f"{config}/grid.info",
                "MIG_PRIVATE_KEY_FILE": f"{config}/id_ed25519",
                "PYTHONDONTWRITEBYTECODE": "1",
            },
            **({"engine": True} if engine else {}),
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


class TemplateError(ValueError):
    """A template directory MIG cannot make an app of; the message says what to change."""


VOLUME_RE = re.compile(r"^\{volume:([A-Za-z][A-Za-z0-9_-]{0,63})\}$")


def mig_volumes(manifest):
    """(code volume, config volume) of the component that serves MIG: its working
    directory and its MIG_CONFIG_DIR. Raises TemplateError."""
    for component in manifest.get("components", []):
        command = component.get("command", [])
        if "manage.py" in command and "serve" in command:
            code = VOLUME_RE.match(component.get("cwd", ""))
            config = VOLUME_RE.match(component.get("env", {}).get("MIG_CONFIG_DIR", ""))
            if not code or not config:
                raise TemplateError(
                    f'component {component.get("name")!r} runs MIG: give it "cwd": "{{volume:CODE}}" (MIG\'s '
                    'code goes there) and "env": {"MIG_CONFIG_DIR": "{volume:CONFIG}"}'
                )
            volumes = manifest.get("volumes", [])
            for name in (code[1], config[1]):
                if name not in volumes:
                    raise TemplateError(f'volume {name!r} is used by the MIG component but not in "volumes"')
            return code[1], config[1]
    raise TemplateError(
        'no component runs MIG: add one whose command is ["{prop:mig_python}", "manage.py", "serve"]'
    )


def app_template(directory):
    """(manifest, files, version) of an operator's app template directory: manifest.json
    and volumes/NAME/... as first content, with MIG's code put in the MIG component's code
    volume. Raises TemplateError."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise TemplateError(f"{directory}/manifest.json is missing") from None
    except (OSError, ValueError) as e:
        raise TemplateError(f"{directory}/manifest.json: {e}") from None
    if not isinstance(manifest, dict):
        raise TemplateError(f"{directory}/manifest.json must hold a JSON object")
    code, _ = mig_volumes(manifest)
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and rel.parts[0] == "volumes" and "__pycache__" not in rel.parts:
            files[str(rel)] = path.read_bytes()
    files.update({f"volumes/{code}/{rel}": data for rel, data in read_tree(MIG_APP_PATHS).items()})
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    files, version = versioned(files)
    return manifest, files, version


def install_app(
    driver, app, template, files, version, grid_info, key=None, env=None, properties=None, start=True
):
    """Provision `app` from a template with MIG in it (see mig_volumes), its config volume
    filled in: `grid_info` is the text of grid.info, `key` the private key's bytes and `env`
    the variables for mig.env (MIG_USERNAME, MIG_PASSWORD, ...). They travel with the app."""
    _, config = mig_volumes(json.loads(files["manifest.json"]))
    driver.ensure_template(template, files, version)
    driver.provision(app, template, properties or {}, start=False)
    driver.put_file(app, f"volumes/{config}/grid.info", grid_info.encode(), 0o644)
    if key is not None:
        driver.put_file(app, f"volumes/{config}/id_ed25519", key, 0o600)
    driver.put_file(app, f"volumes/{config}/mig.env", env_file(env or {}).encode(), 0o600)
    if start:
        driver.start(app, listen=True)


def provision_mig_app(
    driver, app, python, grid_info, key=None, env=None, properties=None, start=True, engine=False
):
    """Provision a MigApp on `driver`'s grid, with MIG's config volume filled in."""
    files, version = mig_app_template(python, engine=engine)
    properties = {"python": python, **(properties or {})}
    install_app(driver, app, MIG_APP_TEMPLATE, files, version, grid_info, key, env, properties, start)
