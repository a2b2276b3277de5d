"""Grids whose authorized_keys line is the one `manage.py grids --authorized-keys` prints:
MIG's work goes through the gate on real sshd, and nothing else does."""

import subprocess

import pytest

from .conftest import run_manage
from .sshd import start_sshd
from .world import World

ADDRESSES = {"east": "127.0.0.4", "west": "127.0.0.5"}


@pytest.fixture
def restricted(tmp_path, client_key):
    """Two sshd whose only authorized_keys line is MIG's restricted one, and a World on them."""
    hosts = {}
    world = None
    try:
        for name, address in ADDRESSES.items():
            hosts[name] = start_sshd(tmp_path / f"sshd-{name}", address, f"{client_key}.pub")
        config_dir = tmp_path / "config"
        config_dir.mkdir()
        tables = [f"[grids.{name}]\n{host.grid_table(tmp_path / name)}" for name, host in hosts.items()]
        (config_dir / "grid.info").write_text("\n".join(tables))
        env = {"MIG_PRIVATE_KEY_FILE": str(client_key)}
        for name, host in hosts.items():
            printed = run_manage(config_dir, "grids", "--authorized-keys", name, env=env, check=True)
            assert "set restricted = true" in printed.stderr
            (line,) = printed.stdout.splitlines()
            assert line.startswith('restrict,command="') and line.endswith(" mig")
            (host.workdir / "authorized_keys").write_text(line + "\n")
        world = World(tmp_path, list(hosts.values()), client_key, extra_grid_keys="restricted = true\n")
        yield world, hosts
    finally:
        if world is not None:
            world.close()
        for host in hosts.values():  # also when set-up failed: no sshd outlives its test
            host.stop()


def ssh(host, key, *command, input=b""):
    """The key used by hand, as someone who took it would."""
    argv = ["ssh", "-i", str(key), "-p", str(host.port), "-l", host.user, "-F", "/dev/null"]
    argv += ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    return subprocess.run([*argv, host.address, *command], input=input, capture_output=True, timeout=60)


def test_mig_s_work_goes_through_and_the_app_moves(restricted):
    world, hosts = restricted
    world.provision()
    result = world.manage(
        "east", "shop", "migrate_app", "--yes", "west", "shop", "--action", "migrate", "--wait"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert world.wait_job("west", "shop", 1)["state"] == "done"
    assert world.running("west", "shop") and world.state("east", "shop") is None


def test_the_key_does_nothing_else(restricted, client_key, tmp_path):
    world, hosts = restricted
    world.provision()
    east = hosts["east"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not MIG's\n")
    refused = [
        ("id",),
        ("sh", "-c", "id"),
        ("rsync", "--server", "-logDtpr", ".", str(tmp_path / "east/apps/shop/volumes/")),  # receiving
        ("rsync", "--server", "--sender", "-logDtpr", ".", f"{outside}/"),
        ("rsync", "--server", "--sender", "-rL", ".", f"{tmp_path}/east/apps/shop/volumes/"),  # follows links
        (
            "rsync",
            "--server",
            "--sender",
            "--remove-source-files",
            "-r",
            ".",
            f"{tmp_path}/east/apps/shop/volumes/",
        ),
        ("mig-put", str(outside / "planted"), "644"),
        ("mig-put", f"{tmp_path}/east/../outside/planted", "644"),
        ("python3", "-c", "print(1)"),
    ]
    for command in refused:
        result = ssh(east, client_key, *command, input=b"planted\n")
        assert result.returncode == 126, (command, result)
        assert b"mig-gate: refused" in result.stderr, (command, result.stderr)
    # No shell, no SFTP, no forwarding.
    sftp = subprocess.run(
        [
            "sftp",
            "-i",
            str(client_key),
            "-P",
            str(east.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-b",
            "-",
            f"{east.user}@{east.address}",
        ],
        input=b"ls /\n",
        capture_output=True,
        timeout=60,
    )
    assert sftp.returncode != 0
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    # A symlink in the grid's root leads a put nowhere.
    (tmp_path / "east/apps/shop/volumes/data/link").symlink_to(outside)
    put = ssh(
        east, client_key, "mig-put", f"{tmp_path}/east/apps/shop/volumes/data/link/planted", "600", input=b"x"
    )
    assert put.returncode != 0 and not (outside / "planted").exists()
