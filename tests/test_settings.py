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


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MIG_NO_LOGIN": "true", "MIG_USERNAME": "admin", "MIG_PASSWORD": "x"},
            "MIG_NO_LOGIN=true and MIG_USERNAME are both set: choose one",
        ),
        ({"MIG_APP_URL": "ftp://host/"}, "MIG_APP_URL must be an http:// or https:// URL with a host"),
        ({"MIG_APP_URL": "http:///path"}, "MIG_APP_URL must be an http:// or https:// URL with a host"),
        (
            {"MIG_HELPER_FREEZE_AFTER": "verifying"},
            "MIG_HELPER_FREEZE_AFTER must be one of , source_stopped, decision (got 'verifying')",
        ),
    ],
)
def test_contradictions_are_refused(config_dir, env, message):
    result = run_manage(config_dir, "check", env=env)
    assert result.returncode != 0
    assert message in result.stderr


def allowed(config_dir, **env):
    code = "from django.conf import settings; print(settings.ALLOWED_HOSTS, settings.CSRF_TRUSTED_ORIGINS)"
    return run_manage(config_dir, "shell", "-v0", "-c", code, env=env, check=True).stdout.strip()


def test_only_the_published_host_and_loopback_are_served(config_dir):
    # Any other Host header is refused: a page elsewhere cannot reach MIG by DNS rebinding.
    assert allowed(config_dir) == "['localhost', '127.0.0.1', '[::1]'] []"
    assert allowed(config_dir, MIG_APP_URL="https://shop.example:8443/") == (
        "['shop.example', 'localhost', '127.0.0.1', '[::1]'] ['https://shop.example:8443']"
    )
    assert allowed(config_dir, MIG_APP_URL="http://[fd00::5]:8080/").startswith("['[fd00::5]', 'localhost'")
    assert allowed(config_dir, ALLOWED_HOSTS="mig.example") == "['mig.example'] []"


def test_without_login_mig_listens_on_loopback_only(settings, monkeypatch):
    from migrations_app.management.commands.serve import MigServer

    monkeypatch.setenv("MIG_APP_URL", "http://127.0.0.9:8123/")
    monkeypatch.delenv("MIG_BIND", raising=False)
    assert MigServer().cfg.bind == ["127.0.0.9:8123"]
    settings.MIG_NO_LOGIN = True
    assert MigServer().cfg.bind == ["127.0.0.1:8123"]


def test_https_deployment_passes_django_s_deploy_checks(config_dir):
    env = {"MIG_HTTPS": "true", "MIG_APP_URL": "https://mig.example/"}
    result = run_manage(config_dir, "check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
    plain = run_manage(config_dir, "check", "--deploy", "--fail-level", "WARNING")
    assert plain.returncode != 0 and "SECURE_SSL_REDIRECT" in plain.stderr
