"""`manage.py grids`: a table of every grid's health; non-zero exit when one fails."""

from migrations_app.grids import gridinfo, open_grid

from .conftest import GRID_HOSTS, grid_table, run_manage
from .sshd import free_port, start_sshd


def write_grid_info(config_dir, tables):
    text = "".join(f"[grids.{name}]\n{table}\n" for name, table in tables.items())
    (config_dir / "grid.info").write_text(text)


def test_checks_every_grid(config_dir, ssh_hosts, client_key, tmp_path):
    a, b = ssh_hosts
    closed_port = free_port(a.address)
    write_grid_info(
        config_dir,
        {
            "east": grid_table("ssh", tmp_path / "east", ssh_hosts, 0),
            "west": grid_table("local", tmp_path / "west"),
            "spoofed": a.grid_table(tmp_path / "s").replace(a.host_key, b.host_key),
            "gone": a.grid_table(tmp_path / "g").replace(f"port = {a.port}", f"port = {closed_port}"),
        },
    )
    env = {"MIG_PRIVATE_KEY_FILE": client_key}
    run_manage(config_dir, "startup", env=env, check=True)
    for name in ("east", "west"):
        result = run_manage(config_dir, "grids", "--init", name, env=env, check=True)
        assert result.stdout.strip() == f"grid {name}: {tmp_path / name} initialised"
    again = run_manage(config_dir, "grids", "--init", "east", env=env, check=True)
    assert "already initialised" in again.stdout

    result = run_manage(config_dir, "grids", env=env)
    assert result.returncode == 1
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["GRID"][:5] == ["GRID", "ADDRESS", "REACHABLE", "HOST", "KEY"]
    assert rows["east"][2:5] == ["yes", "ok", "ok"] and rows["east"][-1] == "0"
    assert rows["west"][1:5] == ["local", "-", "-", "ok"]
    assert rows["spoofed"][2:4] == ["no", "MISMATCH"]  # "reachable" means the login worked
    assert rows["gone"][2] == "no"
    assert "spoofed: ssh" in result.stderr and "HOST KEY MISMATCH" in result.stderr
    assert "2 of 4 grid(s) failed the check" in result.stderr

    only_good = run_manage(config_dir, "grids", "east", "west", env=env)
    assert only_good.returncode == 0, only_good.stderr


def test_uninitialised_grid_says_what_to_do(config_dir, tmp_path):
    write_grid_info(config_dir, {"west": grid_table("local", tmp_path / "west")})
    result = run_manage(config_dir, "grids")
    assert result.returncode == 1
    assert "is not a grid yet: run manage.py grids --init west" in result.stderr


def test_lists_apps(config_dir, tmp_path):
    write_grid_info(config_dir, {"east": grid_table("local", tmp_path / "east")})
    run_manage(config_dir, "grids", "--init", "east", check=True)
    assert run_manage(config_dir, "grids", "--apps", "east", check=True).stdout == "no apps on grid east\n"
    grid = open_grid(gridinfo.load(config_dir / "grid.info")["east"], "unused-for-local")
    grid.define("shop", {"volumes": [], "components": []})
    result = run_manage(config_dir, "grids", "--apps", "east", check=True)
    assert result.stdout.split() == ["shop", "stopped"]
    missing = run_manage(config_dir, "grids", "--apps", "north")
    assert "no grid 'north' in grid.info (known: east)" in missing.stderr


def test_bad_grid_info_is_one_line(config_dir):
    (config_dir / "grid.info").write_text("[grids.x]\n")
    result = run_manage(config_dir, "grids")
    assert result.returncode != 0
    assert result.stderr.strip().endswith("grid 'x', key 'driver': is required")


def test_authorized_keys_only_for_a_grid_reached_by_ssh(config_dir, tmp_path, client_key):
    write_grid_info(config_dir, {"west": grid_table("local", tmp_path / "west")})
    result = run_manage(
        config_dir, "grids", "--authorized-keys", "west", env={"MIG_PRIVATE_KEY_FILE": client_key}
    )
    assert result.returncode != 0
    assert "grid west is reached without SSH: it has no key to restrict" in result.stderr
    assert result.stdout == ""


def test_every_way_a_grid_fails_is_one_line_saying_what_to_do(config_dir, ssh_hosts, client_key, tmp_path):
    a = ssh_hosts[0]
    no_sftp = start_sshd(tmp_path / "nosftp", GRID_HOSTS[0], f"{client_key}.pub", sftp=False)
    try:
        tables = {
            "nosftp": no_sftp.grid_table(tmp_path / "n"),
            "stranger": a.grid_table(tmp_path / "w").replace(f'user = "{a.user}"', 'user = "nobody"'),
            "closed": a.grid_table(tmp_path / "c").replace(
                f"port = {a.port}", f"port = {free_port(a.address)}"
            ),
        }
        write_grid_info(config_dir, tables)
        result = run_manage(config_dir, "grids", env={"MIG_PRIVATE_KEY_FILE": client_key})
    finally:
        no_sftp.stop()
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    problems = dict(line.split(": ", 1) for line in result.stderr.splitlines() if ": " in line)
    assert "yes" in rows["nosftp"] and "FAILED" in rows["nosftp"]
    assert "no SFTP" in problems["nosftp"] and "Subsystem sftp internal-sftp" in problems["nosftp"]
    assert "no (login refused)" in rows["stranger"]
    assert "put MIG's public key in ~nobody/.ssh/authorized_keys" in problems["stranger"]
    assert rows["closed"].split()[2] == "no"
    assert "does its sshd listen on port" in problems["closed"]
    # Without MIG's key, no grid is said to be reachable, and the fix is named.
    missing = run_manage(config_dir, "grids", env={"MIG_PRIVATE_KEY_FILE": tmp_path / "nokey"})
    assert all("not tried" in line for line in missing.stdout.splitlines()[1:]), missing.stdout
    assert "does not exist: MIG logs in to grids with it; create it (ssh-keygen" in missing.stderr
    assert "Traceback" not in missing.stderr
