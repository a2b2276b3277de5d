"""`manage.py startup` with no lock: prepare the config volume; idempotent; strict on input."""

import os
import sqlite3
import stat

from .conftest import run_manage

GRID_INFO = """\
[grids.east]
driver = "hostgrid"
transport = "local"
root = "/srv/east"
app_url = "http://127.0.0.1:8001/"

[grids.west]
driver = "hostgrid"
transport = "local"
root = "/srv/west"
"""
LOGIN = {"MIG_USERNAME": "operator", "MIG_PASSWORD": "correct horse"}


def db_rows(config_dir, sql):
    with sqlite3.connect(config_dir / "mig.sqlite3") as db:
        return db.execute(sql).fetchall()


def test_first_run_prepares_everything(config_dir):
    (config_dir / "grid.info").write_text(GRID_INFO)
    result = run_manage(config_dir, "startup", env=LOGIN, check=True)
    assert "applied" in result.stdout
    assert "grids added: east, west" in result.stdout
    assert "created login user 'operator'" in result.stdout
    assert (config_dir / "logs").is_dir()
    assert db_rows(config_dir, "PRAGMA journal_mode") == [("wal",)]
    assert db_rows(config_dir, "SELECT name, app_url FROM migrations_app_grid ORDER BY name") == [
        ("east", "http://127.0.0.1:8001/"),
        ("west", "http://127.0.0.1:8080/"),
    ]
    assert db_rows(config_dir, "SELECT username, is_superuser FROM auth_user") == [("operator", 1)]


def test_second_run_changes_nothing_and_says_so(config_dir):
    (config_dir / "grid.info").write_text(GRID_INFO)
    run_manage(config_dir, "startup", env=LOGIN, check=True)
    before = db_rows(config_dir, "SELECT * FROM migrations_app_grid") + db_rows(
        config_dir, "SELECT password FROM auth_user"
    )
    result = run_manage(config_dir, "startup", env=LOGIN, check=True)
    assert result.stdout.strip() == "startup: nothing to do, everything was already in place."
    after = db_rows(config_dir, "SELECT * FROM migrations_app_grid") + db_rows(
        config_dir, "SELECT password FROM auth_user"
    )
    assert after == before


def test_empty_config_dir_without_grid_info(config_dir):
    first = run_manage(config_dir, "startup", check=True)
    assert "no grid.info" in first.stderr
    password_file = config_dir / "password"
    assert f"log in as 'operator' with the password kept in {password_file} (mode 0600)" in first.stdout
    assert password_file.read_text().strip() not in first.stdout + first.stderr
    second = run_manage(config_dir, "startup", check=True)
    assert "nothing to do" in second.stdout.splitlines()[-1]


def test_without_a_username_the_login_is_generated_once_and_private(config_dir):
    run_manage(config_dir, "startup", check=True)
    password_file = config_dir / "password"
    password = password_file.read_text().strip()
    assert len(password) >= 20 and stat.S_IMODE(password_file.stat().st_mode) == 0o600
    run_manage(config_dir, "startup", check=True)
    assert password_file.read_text().strip() == password
    assert db_rows(config_dir, "SELECT username, is_active FROM auth_user") == [("operator", 1)]
    check = run_manage(config_dir, "shell", "-v0", "-c", CHECK_PASSWORD.format(password=password), check=True)
    assert check.stdout.strip() == "True"


CHECK_PASSWORD = (
    "from django.contrib.auth import authenticate; from django.test import RequestFactory; "
    "print(authenticate(RequestFactory().get('/'), username='operator', password='{password}') is not None)"
)


def test_no_login_only_when_asked_for_and_it_says_so(config_dir):
    run_manage(config_dir, "startup", env=LOGIN, check=True)
    result = run_manage(config_dir, "startup", env={"MIG_NO_LOGIN": "true"}, check=True)
    assert "MIG_NO_LOGIN is set: the web interface asks for no login, on loopback only" in result.stderr
    assert "deactivated 1 former login user(s)" in result.stdout
    assert not (config_dir / "password").exists()


def test_everything_on_the_config_volume_is_private(config_dir):
    # A config volume from before: files others could read, and a directory they could enter.
    config_dir.chmod(0o755)
    (config_dir / "grid.info").write_text(GRID_INFO)
    (config_dir / "grid.info").chmod(0o644)
    (config_dir / "logs").mkdir(mode=0o755)
    (config_dir / "logs/old.log").write_text("old\n")
    (config_dir / "logs/old.log").chmod(0o664)
    (config_dir / "elsewhere").symlink_to("/etc/hostname")  # a link is neither followed nor changed
    result = run_manage(config_dir, "startup", env=LOGIN, check=True)
    assert f"made 4 entries of {config_dir} private" in result.stdout
    modes = {}
    for path in [config_dir, *config_dir.rglob("*")]:
        if not path.is_symlink():
            modes[str(path.relative_to(config_dir))] = stat.S_IMODE(path.lstat().st_mode)
    assert {"mig.sqlite3", "secret_key", "logs", "logs/old.log"} <= modes.keys()
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    assert stat.S_IMODE(os.stat("/etc/hostname").st_mode) & 0o044


def test_login_user_follows_the_environment(config_dir):
    run_manage(config_dir, "startup", env=LOGIN, check=True)
    changed = run_manage(config_dir, "startup", env=dict(LOGIN, MIG_PASSWORD="new"), check=True)
    assert "updated login user 'operator'" in changed.stdout
    renamed = run_manage(
        config_dir, "startup", env={"MIG_USERNAME": "admin", "MIG_PASSWORD": "x"}, check=True
    )
    assert "deactivated 1 former login user(s)" in renamed.stdout
    assert db_rows(config_dir, "SELECT username, is_active FROM auth_user ORDER BY username") == [
        ("admin", 1),
        ("operator", 0),
    ]


def test_grid_info_change_is_mirrored(config_dir):
    grid_info = config_dir / "grid.info"
    grid_info.write_text(GRID_INFO)
    run_manage(config_dir, "startup", check=True)
    grid_info.write_text(GRID_INFO.replace("/srv/west", "/srv/west-2"))
    result = run_manage(config_dir, "startup", check=True)
    assert "grids updated: west" in result.stdout
    assert db_rows(config_dir, "SELECT root FROM migrations_app_grid WHERE name='west'") == [("/srv/west-2",)]


def test_malformed_grid_info_names_file_line_grid_and_changes_nothing(config_dir):
    grid_info = config_dir / "grid.info"
    grid_info.write_text(GRID_INFO.replace('root = "/srv/west"', 'root = "/srv/west"\nhots = "typo"'))
    result = run_manage(config_dir, "startup", env=LOGIN)
    assert result.returncode != 0
    error = result.stderr.strip()
    assert error == (
        f"CommandError: {grid_info}: line 11: grid 'west', key 'hots': unknown key "
        "(known: app_ports, app_url, command_timeout, connect_timeout, docker_socket, driver, host, "
        "host_key, image, port, python, restricted, root, transport, user)"
    )
    assert not (config_dir / "mig.sqlite3").exists()
    assert not (config_dir / "logs").exists()


def test_unreadable_grid_info(config_dir):
    (config_dir / "grid.info").mkdir()
    result = run_manage(config_dir, "startup")
    assert result.returncode != 0
    assert "cannot read grid.info" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_toml_syntax_error_names_line(config_dir):
    (config_dir / "grid.info").write_text("[grids.east\ndriver = 1\n")
    result = run_manage(config_dir, "startup")
    assert result.returncode != 0
    assert "grid.info: not valid TOML" in result.stderr and "line 1" in result.stderr
