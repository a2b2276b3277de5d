"""`manage.py startup` with no lock: prepare the config volume; idempotent; strict on input."""

import sqlite3

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
    assert "MIG_USERNAME is empty" in first.stderr
    second = run_manage(config_dir, "startup", check=True)
    assert "nothing to do" in second.stdout


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
        "(known: app_url, command_timeout, connect_timeout, driver, host, host_key, port, python, "
        "root, transport, user)"
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
