from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from migrations_app import config
from migrations_app.grids import (
    AuthError,
    ConfigError,
    GridError,
    HostKeyError,
    InvalidName,
    TransportError,
    authorized_keys_line,
    validate_name,
)
from migrations_app.grids.transport import load_private_key
from migrations_app.helper.progress import human_bytes
from migrations_app.models import Grid


@dataclass
class Check:
    grid: str
    address: str
    reachable: str = "-"
    host_key: str = "-"
    driver: str = "-"
    free: str = "-"
    apps: str = "-"
    problem: str = ""

    @property
    def ok(self):
        return not self.problem


def check_grid(grid_config) -> Check:
    """Connect to one grid and ask its driver about itself. Each way it can fail is one
    line saying what is wrong and how to fix it; "reachable" means MIG logged in."""
    check = Check(grid_config.name, grid_config.address)
    ssh = grid_config.transport == "ssh"
    if ssh:
        try:
            load_private_key(config.settings.MIG_PRIVATE_KEY_FILE)
        except AuthError as e:
            check.reachable = "not tried"
            check.problem = (
                f"{e}: MIG logs in to grids with it; create it (ssh-keygen -t ed25519 -N '' -f FILE) "
                "or point MIG_PRIVATE_KEY_FILE at it"
            )
            return check
    try:
        with config.driver_for(grid_config) as driver:
            info = driver.info()
    except HostKeyError as e:
        check.reachable, check.host_key = "no", "MISMATCH"
        check.problem = f"{e}; if the host's key changed on purpose, put its new key in grid.info's host_key"
        return check
    except AuthError as e:
        check.reachable, check.host_key = "no (login refused)", "ok"
        check.problem = (
            f"{e}: put MIG's public key in ~{grid_config.user}/.ssh/authorized_keys on the host (or the line "
            f"`manage.py grids --authorized-keys {grid_config.name}` prints), and check user = in grid.info"
        )
        return check
    except TransportError as e:
        check.reachable = "no"
        check.problem = (
            f"{e}: is the host up, and does its sshd listen on port {grid_config.port}?" if ssh else str(e)
        )
        return check
    except GridError as e:
        check.reachable, check.host_key = ("yes", "ok") if ssh else ("-", "-")
        check.driver, check.problem = "FAILED", str(e)
        return check
    except Exception as e:  # never a traceback: whatever it is, it is this grid's line
        check.reachable, check.problem = "?", f"unexpected {type(e).__name__}: {e}"
        return check
    if ssh:
        check.reachable, check.host_key = "yes", "ok"
    check.free, check.apps = human_bytes(info.free_bytes), str(info.apps)
    check.driver, check.problem = info.problem(grid_config) or ("ok", "")
    return check


class Command(BaseCommand):
    help = (
        "Check every grid in grid.info: reachable, host key, driver, free space, apps. "
        "Exits non-zero when a grid fails."
    )

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", metavar="GRID", help="check only these grids")
        parser.add_argument("--apps", metavar="GRID", help="list the apps on GRID with their states")
        parser.add_argument("--start", metavar="GRID/APP", help="start an app (its components) on GRID")
        parser.add_argument(
            "--stop", metavar="GRID/APP", help="stop an app on GRID (SIGTERM; what a held job may ask for)"
        )
        parser.add_argument(
            "--init",
            metavar="GRID",
            help="make GRID's root a grid (directories and its name); safe to repeat",
        )
        parser.add_argument(
            "--authorized-keys",
            metavar="GRID",
            help=(
                "print the authorized_keys line that lets MIG's key do only MIG's work on GRID "
                "(no shell, no forwarding): put it in the grid user's ~/.ssh/authorized_keys "
                "instead of the plain key, and set restricted = true for GRID in grid.info"
            ),
        )

    def handle(self, *args, **options):
        try:
            configs = config.grid_configs()
        except ConfigError as e:
            raise CommandError(str(e)) from None
        if options["init"]:
            return self.init(self.pick(configs, options["init"]))
        if options["authorized_keys"]:
            return self.authorized_keys(self.pick(configs, options["authorized_keys"]))
        if options["apps"]:
            return self.list_apps(self.pick(configs, options["apps"]))
        for verb in ("start", "stop"):
            if options[verb]:
                return self.start_or_stop(configs, verb, options[verb])
        selected = [self.pick(configs, n) for n in options["names"]] or list(configs.values())
        if not selected:
            raise CommandError(f"no grids in {config.settings.MIG_GRID_INFO_FILE}")
        with ThreadPoolExecutor(max_workers=8) as pool:
            checks = list(pool.map(check_grid, selected))
        self.print_table(checks)
        self.record(checks)
        failed = [c for c in checks if not c.ok]
        for check in failed:
            self.stderr.write(f"{check.grid}: {check.problem}")
        if failed:
            raise CommandError(f"{len(failed)} of {len(checks)} grid(s) failed the check", returncode=1)

    def record(self, checks):
        """Keep each result for the web form; a diagnostic run before startup has no table."""
        if Grid._meta.db_table not in connection.introspection.table_names():
            return
        for check in checks:
            Grid.objects.record_check(check.grid, check.ok, check.problem or "ok")

    def pick(self, configs, name):
        if name not in configs:
            raise CommandError(f"no grid {name!r} in grid.info (known: {', '.join(configs) or 'none'})")
        return configs[name]

    def print_table(self, checks):
        header = ("GRID", "ADDRESS", "REACHABLE", "HOST KEY", "DRIVER", "FREE", "APPS")
        rows = [header] + [
            (c.grid, c.address, c.reachable, c.host_key, c.driver, c.free, c.apps) for c in checks
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            self.stdout.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())

    def on_grid(self, grid_config, operation):
        """Run operation(driver) on one grid; a grid error is the command's error."""
        try:
            with config.driver_for(grid_config) as driver:
                return operation(driver)
        except GridError as e:
            raise CommandError(str(e)) from None

    def list_apps(self, grid_config):
        apps = self.on_grid(grid_config, lambda driver: driver.list_apps())
        if not apps:
            self.stdout.write(f"no apps on grid {grid_config.name}")
        for app in apps:
            self.stdout.write(f"{app.name:<40} {app.state}")

    def start_or_stop(self, configs, verb, name):
        grid, _, app = name.partition("/")
        grid_config = self.pick(configs, grid)
        try:
            validate_name(app)
        except InvalidName as e:
            raise CommandError(f"--{verb} GRID/APP: {e}") from None
        if verb == "start":
            result = self.on_grid(grid_config, lambda driver: driver.start(app, listen=True))
            said = "started" if result.get("started") else "was running already"
            if result.get("listening") is False:
                said += ", but nothing answers where the grid publishes it yet"
        else:
            self.on_grid(grid_config, lambda driver: driver.stop(app))
            said = "stopped"
        self.stdout.write(f"{name}: {said}")

    def authorized_keys(self, grid_config):
        if grid_config.transport != "ssh":
            raise CommandError(f"grid {grid_config.name} is reached without SSH: it has no key to restrict")
        try:
            key = load_private_key(config.settings.MIG_PRIVATE_KEY_FILE)
        except AuthError as e:
            raise CommandError(str(e)) from None
        self.stdout.write(authorized_keys_line(grid_config, f"{key.get_name()} {key.get_base64()} mig"))
        if not grid_config.restricted:
            self.stderr.write(
                f"then set restricted = true for grid {grid_config.name} in grid.info: MIG writes "
                "files through the gate, and rsync shows it its paths"
            )

    def init(self, grid_config):
        changed = self.on_grid(grid_config, lambda driver: driver.init())
        verb = "initialised" if changed else "already initialised"
        self.stdout.write(f"grid {grid_config.name}: {grid_config.root} {verb}")
