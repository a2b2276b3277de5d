"""Settings come from the environment; a bad value is one clear line and writes nothing."""

import stat

import pytest

from .conftest import run_manage


def test_defaults_start(config_dir):
    result = run_manage(config_dir, "check")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MIG_MODE": "teleport"}, "MIG_MODE must be one of migrate, snapshot, both (got 'teleport')"),
        ({"MIG_USERNAME": "admin"}, "MIG_PASSWORD is empty while MIG_USERNAME is set"),
        ({"DEBUG": "maybe"}, "DEBUG must be true or false (got 'maybe')"),
        ({"MIG_LOG_LEVEL": "loud"}, "MIG_LOG_LEVEL must be one of debug, info, warning, error (got 'loud')"),
    ],
)
def test_bad_value_is_one_line_error(config_dir, env, message):
    result = run_manage(config_dir, "startup", env=env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"mig: configuration error: {message}"]
    assert not (config_dir / "mig.sqlite3").exists()


def test_mode_is_case_insensitive(config_dir):
    assert run_manage(config_dir, "check", env={"MIG_MODE": "Snapshot"}).returncode == 0


def test_unwritable_config_dir(tmp_path):
    # A path below a regular file cannot be created, whoever runs the test (root included).
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_manage(blocker / "config", "startup")
    assert result.returncode != 0
    line = result.stderr.strip()
    assert line.startswith("mig: configuration error: MIG_CONFIG_DIR: cannot create")
    assert "\n" not in line


def test_secret_key_generated_once_and_private(config_dir):
    run_manage(config_dir, "check", check=True)
    key_file = config_dir / "secret_key"
    first = key_file.read_text()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(first.strip()) >= 50
    run_manage(config_dir, "check", check=True)
    assert key_file.read_text() == first


def test_secret_key_from_environment_is_not_written(config_dir):
    run_manage(config_dir, "check", env={"SECRET_KEY": "x" * 60}, check=True)
    assert not (config_dir / "secret_key").exists()
