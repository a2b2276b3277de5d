"""
MIG's settings, read from the environment.

The seed's appliance properties become MIG_* variables (see DESIGN.md, "Configuration").
Each helper below raises ImproperlyConfigured with a one-line message naming the variable,
so a bad value stops MIG before it touches anything.
"""

import ipaddress
import os
import secrets
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured

from migrations_app.helper.protocol import FREEZE_POINTS

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

MODES = ("migrate", "snapshot", "both")
LOG_LEVELS = ("debug", "info", "warning", "error")


def env_choice(name, choices, default):
    value = env.str(name, default=default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)} (got {value!r})")
    return value


def env_bool(name, default=False):
    value = env.str(name, default="").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be true or false (got {value!r})")


def env_number(name, default, low, high, unit="seconds"):
    value = env.str(name, default="").strip()
    if not value:
        return float(default)
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise ImproperlyConfigured(f"{name} must be a number of {unit} from {low} to {high} (got {value!r})")
    return number


def env_path(name, default):
    value = env.str(name, default="") or str(default)
    return Path(value).expanduser().absolute()


def writable_dir(name, path):
    """The config volume must exist and be writable: everything MIG keeps lives there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImproperlyConfigured(f"{name}: cannot create {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ImproperlyConfigured(f"{name}: {path} is not writable")
    return path


def kept_secret(path, length):
    """A secret generated once and kept in `path` (mode 0600) on the config volume."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(length)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race; use its secret
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def app_url(name):
    """Where the grid publishes this app: empty, or an http(s) URL with a host."""
    value = env.str(name, default="").strip()
    if value:
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ImproperlyConfigured(
                f"{name} must be an http:// or https:// URL with a host (got {value!r})"
            )
    return value


def ip_addresses(name):
    values = env.list(name, default=[])
    for value in values:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ImproperlyConfigured(f"{name} must list IP addresses (got {value[:60]!r})") from None
    return values


def allowed_host(url):
    """The Host header a browser sends for `url`: an IPv6 address in brackets."""
    host = urlsplit(url).hostname
    return f"[{host}]" if ":" in host else host


# The config volume: SQLite database, secret key, job logs. It travels with the app.
CONFIG_DIR = writable_dir("MIG_CONFIG_DIR", env_path("MIG_CONFIG_DIR", BASE_DIR / "var" / "config"))
# Variables may also be kept in mig.env on the config volume, so they travel with the app
# (MIG_PASSWORD among them: keep the file mode 0600). The real environment wins.
if (CONFIG_DIR / "mig.env").is_file():
    environ.Env.read_env(CONFIG_DIR / "mig.env")

# Login is on unless MIG_NO_LOGIN=true (then MIG listens on loopback only, and every page
# says so). Without MIG_USERNAME the login is "operator", with a password generated once
# into the config volume (see MIG_PASSWORD_FILE; `startup` says where it is).
MIG_NO_LOGIN = env_bool("MIG_NO_LOGIN")
MIG_USERNAME = env.str("MIG_USERNAME", default="").strip()
MIG_PASSWORD = env.str("MIG_PASSWORD", default="")
MIG_PASSWORD_FILE = None
if MIG_NO_LOGIN and MIG_USERNAME:
    raise ImproperlyConfigured("MIG_NO_LOGIN=true and MIG_USERNAME are both set: choose one")
if MIG_USERNAME and not MIG_PASSWORD:
    raise ImproperlyConfigured("MIG_PASSWORD is empty while MIG_USERNAME is set")
if not MIG_NO_LOGIN and not MIG_USERNAME:
    MIG_USERNAME = "operator"
    MIG_PASSWORD_FILE = CONFIG_DIR / "password"
    MIG_PASSWORD = kept_secret(MIG_PASSWORD_FILE, 18)
MIG_MODE = env_choice("MIG_MODE", MODES, "both")
MIG_PRIVATE_KEY_FILE = env_path("MIG_PRIVATE_KEY_FILE", CONFIG_DIR / "id_ed25519")
MIG_GRID_INFO_FILE = env_path("MIG_GRID_INFO_FILE", CONFIG_DIR / "grid.info")
# Set by the grid for every component: where this copy of MIG runs.
MIG_GRID = env.str("MIG_GRID", default="")
MIG_APP = env.str("MIG_APP", default="")
MIG_APP_URL = app_url("MIG_APP_URL")

# A copy that moves no data for this long fails instead of hanging.
MIG_STALL_TIMEOUT = env_number("MIG_STALL_TIMEOUT", 60, 1, 86400)
# How long `startup` waits for the helper's result when the app comes up.
MIG_HELPER_WAIT = env_number("MIG_HELPER_WAIT", 60, 1, 86400)
# Helper silence (no heartbeat) after which the source grid's watchdog rolls a cut-over back.
MIG_HEARTBEAT_TIMEOUT = env_number("MIG_HEARTBEAT_TIMEOUT", 15, 2, 3600)
# For fault tests only: the helper freezes itself once it has journaled this fact.
MIG_HELPER_FREEZE_AFTER = env_choice("MIG_HELPER_FREEZE_AFTER", ("", *FREEZE_POINTS), "")

SECRET_KEY = env.str("SECRET_KEY", default="") or kept_secret(CONFIG_DIR / "secret_key", 50)
DEBUG = env_bool("DEBUG")
# Only the names MIG is published under: a page elsewhere cannot reach it by DNS rebinding.
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
ALLOWED_HOSTS = env.list(
    "ALLOWED_HOSTS", default=([allowed_host(MIG_APP_URL)] if MIG_APP_URL else []) + LOOPBACK_HOSTS
)
_published = urlsplit(MIG_APP_URL)
CSRF_TRUSTED_ORIGINS = env.list(
    "CSRF_TRUSTED_ORIGINS", default=[f"{_published.scheme}://{_published.netloc}"] if MIG_APP_URL else []
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "migrations_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "index"
LOGOUT_REDIRECT_URL = "login"

# Login failures: after AXES_FAILURE_LIMIT for one user from one address, that pair is
# locked out for a while; the user from elsewhere is not, so nobody can lock the operator
# out. Behind a proxy the address is the client's (see migrations_app.clients). Nothing
# sleeps: a delay would only hold one of the server's threads.
AXES_FAILURE_LIMIT = 5
AXES_CLIENT_IP_CALLABLE = "migrations_app.clients.client_ip"
AXES_COOLOFF_TIME = timedelta(minutes=env_number("MIG_LOCKOUT_MINUTES", 15, 1, 1440, "minutes"))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "lockout.html"
AXES_VERBOSE = False

# Behind an HTTPS proxy (MIG_HTTPS=true): cookies only over HTTPS, and trust the proxy's
# X-Forwarded-Proto header. Cookies are HttpOnly and SameSite=Lax either way.
MIG_HTTPS = env_bool("MIG_HTTPS")
# Proxies in front of MIG whose X-Forwarded-For names the client (addresses).
MIG_TRUSTED_PROXIES = ip_addresses("MIG_TRUSTED_PROXIES")
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = MIG_HTTPS
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if MIG_HTTPS else None
# ...and browsers are told to use HTTPS only (`manage.py check --deploy` is clean). The ping
# is exempt from the redirect: it carries nothing, and grids ask it on the app's own port.
SECURE_SSL_REDIRECT = MIG_HTTPS
SECURE_REDIRECT_EXEMPT = [r"^ping/$"]
SECURE_HSTS_SECONDS = int(env_number("MIG_HSTS_SECONDS", 31536000, 0, 63072000)) if MIG_HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_PRELOAD = False
# Whether every subdomain of MIG's host is HTTPS-only, or the domain is on browsers' preload
# list, is the domain owner's decision, not MIG's: those two checks do not apply.
SILENCED_SYSTEM_CHECKS = ["security.W005", "security.W021"]
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_AGE = 12 * 3600

ROOT_URLCONF = "migsite.urls"
WSGI_APPLICATION = "migsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "migrations_app.context_processors.mig",
            ],
        },
    },
]

# WAL lets the web server read while a command writes; IMMEDIATE transactions take the
# write lock up front, so concurrent writers wait (busy timeout) instead of failing.
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": CONFIG_DIR / "mig.sqlite3",
        # A web worker's thread keeps its connection: opening one (and SQLite reading the
        # schema at its first query) cost more than the rest of answering a status poll.
        # Only requests are concerned: commands keep theirs until they close it (the job
        # runner does after each write, see migration.Runner.take).
        "CONN_MAX_AGE": None,
        "OPTIONS": {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
# The admin's CSS and JS, served by gunicorn itself (whitenoise), straight from the apps.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {"mig": {"level": env_choice("MIG_LOG_LEVEL", LOG_LEVELS, "info").upper()}},
}
