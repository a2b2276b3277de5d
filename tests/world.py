"""Two real grids on two real OpenSSH servers, and apps with MIG inside, for end-to-end tests."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from migrations_app import catalog
from migrations_app.grids import AppNotFound, AppState, gridinfo, open_grid

from .sshd import free_port

PYTHON = sys.executable  # has MIG's requirements: the apps' MIG runs with it


class World:
    """Grids `east` (127.0.0.2) and `west` (127.0.0.3), each its own sshd and root. With
    `per_app_ports`, each app on a grid answers on a port of its own."""

    LOGIN = {"MIG_USERNAME": "operator", "MIG_PASSWORD": "s3cret pass"}

    def __init__(self, tmp_path, ssh_hosts, client_key, extra_grid_keys="", per_app_ports=False):
        from .conftest import port_range

        tables = []
        for name, host in zip(("east", "west"), ssh_hosts, strict=True):
            root = tmp_path / name
            table = host.grid_table(root, free_port(host.address)) + extra_grid_keys
            if per_app_ports:
                table = re.sub(r":\d+/\"", ':{port}/"', table) + f"app_ports = {port_range(host.address)}\n"
            tables.append(f"[grids.{name}]\n{table}")
        self.open_grids(tmp_path, client_key, tables)

    def open_grids(self, tmp_path, client_key, tables):
        """Both grids, from their grid.info tables, made ready for apps."""
        self.tmp_path = tmp_path
        self.key = client_key
        self.grid_info = "\n".join(tables)
        self.configs = gridinfo.parse(self.grid_info)
        self.drivers = {}
        for name, config in self.configs.items():
            self.drivers[name] = open_grid(config, client_key)
            self.drivers[name].init()

    def close(self):
        for driver in self.drivers.values():
            for app in driver.list_apps():
                if os.environ.get("MIG_TEST_KEEP_APPS"):  # to read their logs after a failure
                    driver.stop(app.name, force=True)
                else:
                    driver.destroy(app.name)
            driver.close()

    # --- apps ---

    def provision(self, grid="east", app="shop", properties=None, wait=True, padding=0, fill=None, **install):
        """Provision a MigApp with MIG inside; `fill(data_dir)` may put data in before it starts."""
        driver = self.drivers[grid]
        self.install_mig_app(driver, app, properties, **install)
        if padding:
            # Incompressible data, so copies take measurable time. Written straight into the
            # volume, as fill() writes: through a Docker grid's sidecar, 64 MiB took 30 s.
            (self.volume(grid, app, "data") / "padding.bin").write_bytes(os.urandom(padding))
        if fill:
            fill(self.volume(grid, app, "data"))
        driver.start(app)
        if wait:
            assert self.wait_answering(grid, app=app), f"MIG in {grid}/{app} never answered"

    def install_mig_app(self, driver, app, properties):
        catalog.provision_mig_app(
            driver, app, PYTHON, self.grid_info, key=self.key.read_bytes(), env=self.LOGIN,
            properties=properties, start=False,
        )  # fmt: skip

    def app_dir(self, grid, app):
        return Path(self.configs[grid].root) / "apps" / app

    def volume(self, grid, app, name):
        """Where an app's volume is on this machine (the grids' hosts are this machine)."""
        return self.app_dir(grid, app) / "volumes" / name

    def state(self, grid, app):
        """The app's state on `grid`, or None if it does not exist (asked once: it may be
        destroyed at any moment)."""
        try:
            return self.drivers[grid].state(app)
        except AppNotFound:
            return None

    def url(self, grid, app="shop"):
        """Where `app`'s MIG answers on `grid` (its own port, if the grid gives those)."""
        if not self.configs[grid].per_app_ports:
            return self.configs[grid].app_url
        try:
            return self.drivers[grid].describe(app, sizes=False).url
        except AppNotFound:
            return ""

    def answering(self, grid, app="shop"):
        url = self.url(grid, app)
        try:
            with urllib.request.urlopen(url + "ping/", timeout=1) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def wait_answering(self, grid, timeout=30, app="shop"):
        return wait_for(lambda: self.answering(grid, app), timeout)

    # --- MIG inside an app ---

    def mig_env(self, grid, app):
        config = self.volume(grid, app, "config")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIG_")}
        env.update(
            MIG_GRID=grid,
            MIG_APP=app,
            MIG_APP_URL=self.url(grid, app),
            MIG_CONFIG_DIR=str(config),
            MIG_GRID_INFO_FILE=str(config / "grid.info"),
            MIG_PRIVATE_KEY_FILE=str(config / "id_ed25519"),
            DJANGO_SETTINGS_MODULE="migsite.settings",
        )
        return env

    def manage(self, grid, app, *args, timeout=120):
        """Run manage.py from the app's own code volume, as MIG inside it would."""
        code = self.app_dir(grid, app) / "volumes" / "code"
        return subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=code,
            env=self.mig_env(grid, app),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen_manage(self, grid, app, *args):
        code = self.app_dir(grid, app) / "volumes" / "code"
        return subprocess.Popen(
            [PYTHON, "manage.py", *args],
            cwd=code,
            env=self.mig_env(grid, app),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def db(self, grid, app, sql, *params):
        path = self.volume(grid, app, "config") / "mig.sqlite3"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql, params)]

    def job(self, grid, app, job_id=None):
        rows = self.db(grid, app, "SELECT * FROM migrations_app_migrationjob ORDER BY id DESC")
        return next((r for r in rows if job_id in (None, r["id"])), None)

    def events(self, grid, app, job_id):
        return self.db(
            grid, app, "SELECT * FROM migrations_app_jobevent WHERE job_id = ? ORDER BY created, id", job_id
        )

    def filed_journal(self, grid, app, job_id):
        """The helper's journal lines as MIG filed them into the job, in order."""
        rows = self.db(
            grid, app, "SELECT data FROM migrations_app_jobevent WHERE job_id = ? AND seq IS NOT NULL "
            "ORDER BY seq", job_id,
        )  # fmt: skip
        return [json.loads(r["data"]) for r in rows]

    def locks(self, grid, app):
        return self.db(grid, app, "SELECT * FROM migrations_app_lock")

    def wait_job(self, grid, app, job_id, states=("done", "failed"), timeout=90):
        def finished():
            # Only the database of an app that runs is its own: a copy in the making must
            # not be read (opening it would add files to the copy).
            if not self.running(grid, app):
                return None
            try:
                job = self.job(grid, app, job_id)
            except sqlite3.Error:
                return None
            return job if job and job["state"] in states else None

        assert wait_for(finished, timeout), (
            f"job {job_id} on {grid}/{app} did not finish: {self.job(grid, app)}"
        )
        return finished()

    def helper_log(self, grid, helper):
        path = self.volume(grid, helper, "work") / "progress.jsonl"
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def helper_pid(self, grid, helper):
        """The helper's own process (under its supervisor), as its status file says."""
        status = self.volume(grid, helper, "work") / "status.json"
        return json.loads(status.read_text())["pid"]

    def kill_helper(self, grid, helper):
        """kill -9 the helper itself: its grid starts it again. False if it was gone."""
        try:
            os.kill(self.helper_pid(grid, helper), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            return False
        return True

    def kill_helper_app(self, grid, helper, sig=signal.SIGKILL):
        """Signal everything of the helper app, supervisor included (kill -9: it is gone for
        good; SIGSTOP: it is frozen where it is)."""
        leader = int((self.app_dir(grid, helper) / "run" / "helper.pid").read_text().split()[0])
        os.killpg(leader, sig)

    def running(self, grid, app):
        return self.state(grid, app) == AppState.RUNNING


def processes(*markers, cwd=None):
    """Pids of the processes whose command line has every one of `markers` (and who run in
    `cwd`, if given)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
            if all(m in command for m in markers) and (cwd is None or os.readlink(entry / "cwd") == str(cwd)):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def wait_for(predicate, timeout=30.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    return predicate()


# The names many_files() gives its files (a glob).
MANY_FILES = "f[0-9][0-9][0-9][0-9][0-9]"


def many_files(data):
    """20,000 small files: hashing, the live pass and the sweep after the stop take long
    enough to be hit (the sweep: about 0.2 s)."""
    data.mkdir(parents=True, exist_ok=True)
    for i in range(20_000):
        (data / f"f{i:05d}").write_bytes(b"x" * 100)


def tree(path):
    """{relative path: bytes} of every file under `path`."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def journal(path):
    """The data writer's journal: [(where, count)] in order."""
    lines = Path(path).read_text().splitlines()
    return [(line.split()[1], int(line.split()[2])) for line in lines if line.strip()]


class DockerWorld(World):
    """Grids `east` and `west` on two real Docker engines, each reached over its host's sshd
    (127.0.0.2, 127.0.0.3); apps with MIG inside run as containers of MIG's image."""

    def __init__(self, tmp_path, ssh_hosts, client_key, engines):
        from .conftest import docker_table

        self.engines = dict(zip(("east", "west"), engines, strict=True))
        tables = []
        for index, name in enumerate(self.engines):
            table = docker_table(self.engines[name], index, ssh_hosts, free_port(ssh_hosts[index].address))
            tables.append(f"[grids.{name}]\n{table}")
        self.open_grids(tmp_path, client_key, tables)

    def close(self):
        from .conftest import remove_docker_grid

        super().close()
        for name, engine in self.engines.items():
            remove_docker_grid(engine, name)

    def install_mig_app(self, driver, app, properties, data_image=None):
        """As World's, with the image's Python; with `data_image`, the data component runs
        that image (the others, the grid's)."""
        files, version = catalog.mig_app_template("python3")
        if data_image:
            manifest = json.loads(files["manifest.json"])
            for component in manifest["components"]:
                if component["name"] == "data":
                    component["image"] = data_image
            files, version = catalog.versioned({**files, "manifest.json": json.dumps(manifest).encode()})
        catalog.install_app(
            driver, app, catalog.MIG_APP_TEMPLATE, files, version, self.grid_info, key=self.key.read_bytes(),
            env=self.LOGIN, properties={"python": "python3", **(properties or {})}, start=False,
        )  # fmt: skip

    def volume(self, grid, app, name):
        found = self.engines[grid].docker(
            "volume", "inspect", "-f", "{{.Mountpoint}}", f"mig.{grid}.{app}.{name}"
        )
        return Path(found.stdout.strip())

    def exec_argv(self, grid, app, *args):
        """manage.py ARGS run in the app's MIG container, as MIG inside it would."""
        engine = self.engines[grid]
        return [
            "docker",
            "-H",
            f"unix://{engine.socket}",
            "exec",
            f"mig.{grid}.{app}.mig",
            "python3",
            "manage.py",
            *args,
        ]

    def manage(self, grid, app, *args, timeout=120):
        return subprocess.run(
            self.exec_argv(grid, app, *args), capture_output=True, text=True, timeout=timeout
        )

    def popen_manage(self, grid, app, *args):
        argv = self.exec_argv(grid, app, *args)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def helper_pid(self, grid, helper):
        """The helper's container's first process, as the host sees it: killed, the engine
        starts the container again."""
        return self.drivers[grid].describe(helper, sizes=False).components[0].pid

    def kill_helper_app(self, grid, helper, sig=signal.SIGKILL):
        """The helper's container, signalled through the engine: gone for good, or frozen."""
        if sig == signal.SIGSTOP:
            self.engines[grid].docker("pause", f"mig.{grid}.{helper}.helper")
        else:
            self.engines[grid].docker("kill", "--signal", "KILL", f"mig.{grid}.{helper}.helper")
