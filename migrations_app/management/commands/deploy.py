from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from migrations_app import catalog, config, migration
from migrations_app.grids import AppExists, ConfigError, GridError, InvalidName, validate_name

ANSWER_WAIT = 60.0


class Command(BaseCommand):
    help = (
        "Put an app with MIG inside on a grid: TEMPLATE is a directory with the app's "
        "manifest.json (MIG among its components) and volumes/NAME/ with their first content. "
        "MIG's code goes into the MIG component's code volume; this MIG's grid.info and private "
        "key (and --env-file as mig.env) into its config volume, so they travel with the app. "
        "Then the app starts, and this command waits for its MIG to answer. See the README, "
        '"Put MIG in your app".'
    )

    def add_arguments(self, parser):
        parser.add_argument("grid", metavar="GRID", help="a grid from grid.info")
        parser.add_argument("app", metavar="APP", help="the app's name on that grid")
        parser.add_argument("--template", required=True, metavar="DIR", help="the app's template directory")
        parser.add_argument(
            "--property",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a property the manifest declares",
        )
        parser.add_argument(
            "--env-file",
            metavar="FILE",
            help="variables for MIG in the app (MIG_USERNAME, MIG_PASSWORD, ...)",
        )
        parser.add_argument("--no-start", action="store_true", help="provision the app, stopped")

    def handle(self, *args, **options):
        name, app = options["grid"], options["app"]
        directory = Path(options["template"])
        try:
            validate_name(app)
            template = validate_name(directory.resolve().name, "template (the directory's name)")
            grid = config.grid_config(name)
            manifest, files, version = catalog.app_template(directory)
        except (InvalidName, ConfigError, catalog.TemplateError) as e:
            raise CommandError(str(e)) from None
        properties = {}
        for item in options["property"]:
            key, sep, value = item.partition("=")
            if not sep:
                raise CommandError(f"--property {item!r}: write KEY=VALUE")
            properties[key] = value
        env = self.read_env(options["env_file"]) if options["env_file"] else {}
        key = Path(settings.MIG_PRIVATE_KEY_FILE)
        if not key.is_file():
            raise CommandError(f"MIG's private key {key} does not exist: create it first (see the README)")
        grid_info = Path(settings.MIG_GRID_INFO_FILE).read_text()
        try:
            with config.driver_for(grid) as driver:
                catalog.install_app(
                    driver,
                    app,
                    template,
                    files,
                    version,
                    grid_info,
                    key.read_bytes(),
                    env,
                    properties,
                    start=not options["no_start"],
                )
                url = driver.describe(app, sizes=False).url
        except AppExists:
            raise CommandError(f"an app named {app} already exists on {name}") from None
        except GridError as e:
            raise CommandError(str(e)) from None
        self.stdout.write(
            f"{name}/{app} is provisioned from {directory} (template {template}, version {version})"
        )
        if options["no_start"]:
            return
        if not url or not migration.wait_until_answering(url, ANSWER_WAIT):
            raise CommandError(
                f"{name}/{app} started, but its MIG did not answer at {url or 'its URL'}: see its logs"
            )
        _, config_volume = catalog.mig_volumes(manifest)
        login = env.get("MIG_USERNAME") or "operator"
        password = (
            ""
            if "MIG_USERNAME" in env
            else f" (its password is in volumes/{config_volume}/password of the app)"
        )
        self.stdout.write(f"MIG answers at {url}: log in as {login}{password}")

    def read_env(self, path):
        """KEY=VALUE lines (comments and blanks skipped), as mig.env holds them."""
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise CommandError(f"--env-file {path}: {e.strerror}") from None
        env = {}
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip().isidentifier():
                raise CommandError(f"--env-file {path}, line {number}: write KEY=VALUE")
            env[key.strip()] = value.strip().strip("'\"")
        return env
