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
    TransportError,
    authorized_keys_line,
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


def check_grid(grid_config):
    """Connect to one grid and ask its driver about itself."""
    check = Check(grid_config.name, grid_config.address)
    try:
        with config.driver_for(grid_config) as driver:
            info = driver.info()
    except HostKeyError as e:
        check.reachable, check.host_key, check.problem = "yes", "MISMATCH", str(e)
        return check
    except AuthError as e:
        check.reachable, check.host_key, check.problem = "yes", "ok", str(e)
        return check
    except TransportError as e:
        check.reachable, check.problem = "no", str(e)
        return check
    except GridError as e:
        check.reachable = check.host_key = "yes" if grid_config.transport == "ssh" else "-"
        check.driver, check.problem = "FAILED", str(e)
        return check
    if grid_config.transport == "ssh":
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
