import hashlib
import os
import secrets
import select
import signal
import socket
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from migrations_app import catalog, migration
from migrations_app.grids import AppState, GridError, gridinfo, open_grid

APP = "shop"
USERNAME = "demo"
DOCKER_IMAGE = "mig:demo"


class StopSignals:
    """Ctrl-C and SIGTERM, once installed, only set a flag (an interrupt in the middle of a
    request to a grid would leave it half-asked), and wake wait() through signal's wakeup
    fd. The handler takes no lock: one that set a threading.Event could wait for ever on
    the event's lock, were the signal to come while the main thread's Event.wait held it
    (cpython#126434 is that deadlock with multiprocessing.Event)."""

    def __init__(self):
        self.caught = False
        self.wakeup, self.wakeup_end = socket.socketpair()
        for end in (self.wakeup, self.wakeup_end):
            end.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_end.fileno())
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.catch)

    def catch(self, signum, frame):
        self.caught = True

    def wait(self, seconds: float) -> bool:
        """Until a stop signal comes or `seconds` pass; whether one came."""
        if not self.caught:
            select.select([self.wakeup], [], [], seconds)
            try:
                self.wakeup.recv(4096)
            except BlockingIOError:
                pass
        return self.caught


class Command(BaseCommand):
    help = (
        "The embedded demo: two local grids (east and west, directories under --dir), an app "
        "`shop` with MIG inside running on one of them, served until you press Ctrl-C. Open the "
        "URL it prints, log in, and migrate the app to the other grid and back. No SSH, no daemons. "
        "Run it again to pick up where you left off; --rebuild starts from scratch. With --docker, "
        "the grids are docker grids on a Docker engine the demo starts (as root), and the app is "
        "containers and volumes."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dir", default=str(settings.BASE_DIR / "var" / "demo"), help="where the grids live"
        )
        parser.add_argument(
            "--port", type=int, default=8001, help="east's MIG listens on PORT, west's on PORT+1"
        )
        parser.add_argument("--rebuild", action="store_true", help="destroy the demo's apps and start again")
        parser.add_argument(
            "--docker",
            action="store_true",
            help="docker grids, on an engine of the demo's own (needs root, dockerd and mmdebstrap)",
        )

    def handle(self, *args, **options):
        if not 1024 <= options["port"] <= 65534:
            raise CommandError("--port must be from 1024 to 65534")
        self.base = Path(options["dir"]).absolute()
        self.engine = None
        self.grids = {}
        # Until the watch takes them over, Ctrl-C and SIGTERM interrupt the set-up, and the
        # `finally` stops what it started, whatever the parent left them as: a job a script
        # starts in the background (`./dev demo &`) inherits SIGINT ignored.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.default_int_handler)
        try:
            grid = self.set_up(options)
            stop = StopSignals()
            self.stdout.write(
                self.style.SUCCESS(f"\nMIG runs inside {grid}/{APP}: open {self.grids[grid].grid.app_url}\n")
                + f"  user: {USERNAME}\n  password: {self.password()}\n\n"
                "Migrate the app to the other grid and back; this window shows where it runs.\n"
                "Press Ctrl-C to stop the demo (run it again to resume).\n"
            )
            self.watch(stop)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM before the flag took over: while setting up, or in the instant after.
            self.stdout.write("\ninterrupted")
        finally:
            # Whatever ended it, nothing the demo started is left running.
            self.stop_everything()

    # --- set-up ---

    def set_up(self, options):
        """Start the grids and the demo app; return the grid it runs on once MIG answers."""
        if options["docker"]:
            self.base = self.base.with_name(self.base.name + "-docker")
            self.engine = self.start_engine()
        self.base.mkdir(parents=True, exist_ok=True)
        self.grid_info = self.write_grid_info(options["port"])
        self.grids = {name: open_grid(config, "") for name, config in gridinfo.parse(self.grid_info).items()}
        for driver in self.grids.values():
            driver.init()
        if options["rebuild"]:
            self.destroy_everything()
        grid = self.start_app()
        url = self.grids[grid].grid.app_url
        self.stdout.write(f"Waiting for MIG in {grid}/{APP} to answer…")
        if not migration.wait_until_answering(url, 60):
            raise CommandError(f"MIG did not answer at {url}; see the log of {grid}/{APP}'s component mig")
        return grid

    def start_engine(self):
        """The demo's Docker engine (its images and containers kept under --dir, so a demo
        run again resumes), with MIG's image in it."""
        from migrations_app import engines

        if os.geteuid() != 0:
            raise CommandError("--docker starts a Docker engine of its own: run it as root")
        self.stdout.write("starting the demo's Docker engine; MIG's image is built the first time (minutes)…")
        try:
            # Its socket and runtime state: a short path (see engines.py), one per demo directory.
            run = f"/run/mig-demo-{hashlib.sha256(str(self.base).encode()).hexdigest()[:8]}"
            engine = engines.start_engine("demo", data=self.base / "engine", run=run)
            engines.load_image([engine], DOCKER_IMAGE)
        except (OSError, RuntimeError) as e:
            raise CommandError(f"the demo's Docker engine: {e}") from None
        return engine

    def write_grid_info(self, port):
        if self.engine is not None:
            text = "".join(
                f'[grids.{name}]\ndriver = "docker"\ntransport = "local"\nimage = "{DOCKER_IMAGE}"\n'
                f'docker_socket = "{self.engine.socket}"\napp_url = "http://127.0.0.1:{port + i}/"\n\n'
                for i, name in enumerate(("east", "west"))
            )
        else:
            python = os.path.realpath(sys.executable)
            text = "".join(
                f'[grids.{name}]\ndriver = "hostgrid"\ntransport = "local"\nroot = "{self.base / name}"\n'
                f'app_url = "http://127.0.0.1:{port + i}/"\npython = "{python}"\n\n'
                for i, name in enumerate(("east", "west"))
            )
        (self.base / "grid.info").write_text(text)
        return text

    def password(self):
        path = self.base / "password"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(9) + "\n")
        return path.read_text().strip()

    def destroy_everything(self):
        for name, driver in self.grids.items():
            for app in driver.list_apps():
                driver.destroy(app.name)
                self.stdout.write(f"destroyed {name}/{app.name}")

    def apps(self):
        """{grid: {app: state}} on both demo grids."""
        return {name: {a.name: a.state for a in driver.list_apps()} for name, driver in self.grids.items()}

    def where(self, apps=None):
        """{grid: state} of the demo app on each grid that has it."""
        apps = apps or self.apps()
        return {grid: found[APP] for grid, found in apps.items() if APP in found}

    def start_app(self):
        found = self.where()
        running = [g for g, state in found.items() if state == AppState.RUNNING]
        if running:
            self.stdout.write(f"{running[0]}/{APP} is already running")
            return running[0]
        if found:
            grid = "east" if "east" in found else next(iter(found))
            self.stdout.write(f"starting {grid}/{APP} again")
            self.grids[grid].start(APP)
            return grid
        self.stdout.write(f"provisioning {APP} on east (MIG inside, and a component writing data)")
        catalog.provision_mig_app(
            self.grids["east"],
            APP,
            "python3" if self.engine else sys.executable,  # the image's, or this one
            self.grid_info,
            env={"MIG_USERNAME": USERNAME, "MIG_PASSWORD": self.password()},
            # Its grids are reached through the engine's socket: MIG needs it.
            engine=self.engine is not None,
        )
        return "east"

    # --- serving ---

    def watch(self, stop: StopSignals):
        """Say where the apps are whenever that changes, until a stop signal comes."""
        last = None
        while not stop.caught:
            try:
                apps = self.apps()
            except GridError as e:
                self.stderr.write(f"cannot read the grids: {e}")
                apps = last
            if apps != last:
                if last is not None:
                    self.report(apps)
                last = apps
            stop.wait(1)

    def stop_everything(self):
        self.stdout.write("\nstopping the demo…")
        for name, driver in self.grids.items():
            for app in driver.list_apps():
                if app.state != AppState.STOPPED:
                    driver.stop(app.name, force=True)
                    self.stdout.write(f"stopped {name}/{app.name}")
        if self.engine is not None:
            for driver in self.grids.values():
                driver.close()
            self.engine.stop(remove=False)
            self.stdout.write("stopped the demo's Docker engine")
        again = "./dev demo --docker" if self.engine else "./dev demo"
        self.stdout.write(f"stopped; run `{again}` again to resume")

    def report(self, apps):
        """Say where things are now: the demo app, and any helper at work."""
        listing = [
            f"{grid}/{app}: {state}" for grid, found in sorted(apps.items()) for app, state in found.items()
        ]
        self.stdout.write(f"[{time.strftime('%H:%M:%S')}] " + (", ".join(listing) or "no apps"))
        for grid, state in self.where(apps).items():
            if state == AppState.RUNNING:
                self.stdout.write(f"  MIG answers at {self.grids[grid].grid.app_url}")
