"""The README's "Put MIG in your app", followed block by block on two fresh sshd grids:
what it says to run is run (with this machine's addresses, ports, paths and host keys in
place of the example's), and the app it describes moves with MIG inside."""

import getpass
import json
import re
import sqlite3
import subprocess
import sys
import urllib.request

import pytest

from migrations_app.grids import gridinfo, open_grid

from .conftest import GRID_HOSTS, ROOT, mig_env, port_range
from .sshd import GRID_PYTHON, start_sshd
from .world import wait_for

EXAMPLE = {"east": "203.0.113.10", "west": "203.0.113.11"}


def guide_blocks():
    """{name: text} of the README's blocks marked <!-- guide:NAME -->."""
    text = (ROOT / "README.md").read_text()
    return {m[1]: m[2] for m in re.finditer(r"<!-- guide:([\w.]+) -->\n```\w*\n(.*?)```", text, re.S)}


def run(script, cwd, env, what):
    result = subprocess.run(
        ["sh", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{what}:\n{script}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def answers(url):
    try:
        with urllib.request.urlopen(url + "ping/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def hosts(tmp_path):
    """The guide's two grid hosts (sshd); at the end, every app on them is destroyed."""
    started = []
    yield started
    for name in EXAMPLE:
        if (tmp_path / name / "grid.json").exists():
            with local_grid(tmp_path / name) as grid:
                for app in grid.list_apps():
                    grid.destroy(app.name)
    for host in started:
        host.stop()


def local_grid(root):
    """A grid's directory, reached without SSH (to clean up after the guide)."""
    table = f'driver = "hostgrid"\ntransport = "local"\nroot = "{root}"\npython = "{GRID_PYTHON}"\n'
    return open_grid(gridinfo.parse(f"[grids.{root.name}]\n{table}")[root.name], "")


def test_the_guide_puts_mig_in_an_app_that_then_moves(tmp_path, hosts):
    blocks = guide_blocks()
    assert set(blocks) == {"keys", "grid.info", "init", "manifest", "env", "deploy", "inside", "upgrade"}
    work, config = tmp_path / "checkout", tmp_path / "checkout/var/config"
    work.mkdir()
    env = mig_env(config)
    manage = f"{sys.executable} {ROOT}/manage.py"

    # 1-2. MIG's key; ssh-copy-id is the hosts' authorized_keys, here sshd's own file.
    keys = [
        line for line in blocks["keys"].splitlines() if not line.startswith(("ssh-copy-id", "ssh-keyscan"))
    ]
    run("\n".join(keys), work, env, "making MIG's key")
    for name in EXAMPLE:
        hosts.append(start_sshd(tmp_path / f"sshd-{name}", GRID_HOSTS[len(hosts)], config / "id_ed25519.pub"))
    grid_info = ""
    for (name, example), host, table in zip(
        EXAMPLE.items(), hosts, blocks["grid.info"].split("\n\n"), strict=True
    ):
        scanned = run(f"ssh-keyscan -t ed25519 -p {host.port} {host.address}", work, env, "ssh-keyscan")
        host_key = " ".join(scanned.split()[1:3])
        assert host_key == host.host_key  # the fingerprint checks out
        table = re.sub(r'host_key = "[^"]*"', f'host_key = "{host_key}"', table)
        table = table.replace(example, host.address).replace("port = 22", f"port = {host.port}")
        table = table.replace('user = "mig"', f'user = "{getpass.getuser()}"')
        table = table.replace('"/srv/grid"', f'"{tmp_path / name}"').replace('"python3"', f'"{GRID_PYTHON}"')
        grid_info += (
            re.sub(r"app_ports = \[\d+, \d+\]", f"app_ports = {port_range(host.address)}", table) + "\n\n"
        )
    (config / "grid.info").write_text(grid_info)
    for name in EXAMPLE:
        (tmp_path / name).mkdir()
    checked = run(blocks["init"].replace(".venv/bin/python manage.py", manage), work, env, "the grids' check")
    assert all(" ok " in line for line in checked.splitlines()[-2:]), checked

    # 3. The app's template, and MIG's login for it.
    (work / "notes").mkdir()
    (work / "notes/manifest.json").write_text(
        blocks["manifest"].replace("/opt/mig/bin/python", sys.executable)
    )
    run(blocks["env"], work, env, "the login file")

    # 4. Deployed, MIG answers where the grid publishes the app.
    deployed = run(blocks["deploy"].replace(".venv/bin/python manage.py", manage), work, env, "deploy")
    url = re.search(r"MIG answers at (http://\S+): log in as operator", deployed)[1]
    assert url.startswith(f"http://{hosts[0].address}:") and answers(url)

    # 5. MIG's commands, inside the app, as its component runs: the app moves to west.
    inside = (
        blocks["inside"]
        .replace("/srv/grid", str(tmp_path / "east"))
        .replace("/opt/mig/bin/python", sys.executable)
    )
    moved = run(
        inside, work, {k: v for k, v in env.items() if not k.startswith("MIG_")}, "migrate_app inside the app"
    )
    assert "expected: about" in moved and "destroys: the source app east/notes" in moved, moved
    app_json = json.loads((tmp_path / "west/apps/notes/app.json").read_text())
    west_url = f"http://{hosts[1].address}:{app_json['port']}/"
    assert wait_for(lambda: answers(west_url), 60)
    assert wait_for(lambda: not (tmp_path / "east/apps/notes").exists(), 60)  # the target's MIG ends the job
    assert wait_for(lambda: (tmp_path / "west/apps/notes/volumes/data/clock.log").exists(), 30)

    # 6. Upgraded in place: stopped, its code replaced, started; its history is kept.
    upgrade = blocks["upgrade"].replace(".venv/bin/python manage.py", manage)
    upgrade = upgrade.replace(f"mig@{EXAMPLE['west']}:/srv/grid", str(tmp_path / "west")).replace(
        " ./ ", f" {ROOT}/ "
    )
    out = run(upgrade, work, env, "the upgrade")
    assert "west/notes: stopped" in out and "west/notes: started" in out
    assert wait_for(lambda: answers(west_url), 60)
    database = tmp_path / "west/apps/notes/volumes/mig-config/mig.sqlite3"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        assert db.execute("SELECT state FROM migrations_app_migrationjob").fetchall() == [("done",)]
