"""
Components as containers: the docker runtime.

On a docker grid the agent runs in the grid's own container (`mig.<grid>`), which has the
grid's volume (also `mig.<grid>`) at the grid's root and the engine's socket; it drives the
engine with the Docker SDK. Each app's directory (app.json, its state, its cut-over record)
is in the grid's volume, as on a hostgrid; what a hostgrid keeps in it as directories is
here named volumes and containers, all labelled mig.grid, mig.app and mig.role:

    mig.<grid>.<app>.<volume>      a volume per volume of the manifest       (role volume)
    mig.<grid>.<app>               a volume for the app's secrets            (role secrets)
                                   and the app's sidecar container           (role sidecar)
    mig.<grid>.<app>.<component>   a container per component, made from the manifest when
                                   it first starts                           (role component)

The sidecar mounts the grid's volume read-only and the app's volumes and secrets where the
app's directory has them. Whatever reads or writes an app's data runs there (read, put,
scan, delta, sizes, fill, rsync's sender), with no access to the engine. A component
mounts the app's volumes and secrets at the same paths, so {volume:NAME} means one path
everywhere; it gets the engine's socket only if its manifest says "engine": true (the
helper, which drives its grid), and the volumes of the app the manifest "reaches" (the
helper's target). Components run with the host's network (apps answer on the grid's
addresses, as on a hostgrid) and an init process (tini), which passes SIGTERM on.
"""

import hashlib
import json
import os
import time

from .base import AgentError, agent_argv, ensure_dir

# Where the grid's container has the engine's socket.
SOCKET = "/var/run/docker.sock"
IMAGE_HINT = "build it and load it into the engine with conf/docker/build-image"


class ContainerProcess:
    """A started component's container, with the part of a process that op_start watches."""

    def __init__(self, container):
        self.container = container
        self.returncode = None

    def poll(self):
        self.container.reload()
        if self.container.status in ("exited", "dead"):
            self.returncode = self.container.attrs["State"]["ExitCode"]
        return self.returncode


class Containers:
    name = "docker"

    def __init__(self, grid):
        self.grid = grid
        config = grid.config()
        self.grid_name = config["name"]
        self.image = config["image"]
        self.socket = config["docker_socket"]
        self._client = None

    @property
    def client(self):
        # Connected on first use: the sidecar, which has no socket, never needs it.
        if self._client is None:
            import docker  # only a docker grid needs it, and MIG's image has it

            self._client = docker.DockerClient(base_url=f"unix://{SOCKET}", version="auto", timeout=120)
        return self._client

    @property
    def errors(self):
        import docker.errors

        return docker.errors

    # --- names and labels -----------------------------------------------------------------

    def prefix(self, app):
        return f"mig.{self.grid_name}.{app}"

    def labels(self, app, role, **extra):
        return {"mig.grid": self.grid_name, "mig.app": app, "mig.role": role, **extra}

    def mount(self, target, source, read_only=False, kind="volume"):
        from docker.types import Mount

        return Mount(target, source, type=kind, read_only=read_only)

    def app_mounts(self, app, manifest, secrets_read_only):
        """The app's secrets and volumes, where its directory has them."""
        app_dir = self.grid.app_dir(app)
        mounts = [self.mount(f"{app_dir}/secrets", self.prefix(app), read_only=secrets_read_only)]
        for volume in manifest["volumes"]:
            mounts.append(self.mount(f"{app_dir}/volumes/{volume}", f"{self.prefix(app)}.{volume}"))
        return mounts

    def get(self, name):
        try:
            return self.client.containers.get(name)
        except self.errors.NotFound:
            return None

    # --- apps ---------------------------------------------------------------------------

    def create(self, app, manifest, template_dir=None):
        """The app's volumes and its sidecar; with `template_dir`, the volumes filled from the
        template's (by the sidecar, which has them)."""
        app_dir = self.grid.app_dir(app)
        # The sidecar has the grid's volume read-only: the places the app's volumes are
        # mounted at must be there already.
        ensure_dir(os.path.join(app_dir, "secrets"), 0o700)
        self.client.volumes.create(self.prefix(app), labels=self.labels(app, "secrets"))
        for volume in manifest["volumes"]:
            ensure_dir(os.path.join(app_dir, "volumes", volume))
            self.client.volumes.create(
                f"{self.prefix(app)}.{volume}", labels=self.labels(app, "volume", **{"mig.volume": volume})
            )
        sidecar = self.sidecar(app, manifest)
        if template_dir is not None:
            self.in_sidecar(sidecar, "fill", app, "--template", os.path.basename(template_dir))

    def pin(self, manifest):
        """The manifest, each component's image named (the grid's, where it names none): an
        app runs the same images wherever it moves."""
        components = [dict(c, image=c.get("image") or self.image) for c in manifest["components"]]
        return dict(manifest, components=components)

    def images(self, refs):
        """{reference: {"id", "size"}} of images on this engine; id None if it lacks one."""
        found = {}
        for ref in refs:
            try:
                image = self.client.images.get(ref)
                found[ref] = {"id": image.id, "size": image.attrs.get("Size", 0)}
            except self.errors.ImageNotFound:
                found[ref] = {"id": None, "size": 0}
        return found

    def sidecar(self, app, manifest):
        """The app's sidecar, running; made if it is missing."""
        name = self.prefix(app)
        container = self.get(name)
        if container is None:
            mounts = [self.mount(self.grid.root, f"mig.{self.grid_name}", read_only=True)]
            mounts += self.app_mounts(app, manifest, secrets_read_only=False)
            try:
                container = self.client.containers.create(
                    self.image,
                    ["sleep", "infinity"],
                    name=name,
                    labels=self.labels(app, "sidecar"),
                    mounts=mounts,
                    init=True,
                    network_mode="none",
                    restart_policy={"Name": "unless-stopped"},
                )
            except self.errors.APIError as e:
                if e.status_code != 409:  # 409: another agent made it meanwhile
                    raise AgentError(f"app {app!r}: its sidecar cannot be made: {e.explanation}") from None
                container = self.client.containers.get(name)
        if container.status != "running":
            container.start()
        return container

    def in_sidecar(self, sidecar, *args):
        """Run an agent operation in the app's sidecar; its answer's result."""
        code, (out, err) = sidecar.exec_run(agent_argv(self.grid.root, *args), demux=True)
        try:
            reply = json.loads((out or b"").decode("utf-8", "replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            said = (err or b"")[-300:].decode("utf-8", "replace")
            raise AgentError(f"the sidecar's {args[0]} failed (status {code}): {said}") from None
        if not reply.get("ok"):
            raise AgentError(f"the sidecar's {args[0]}: {reply.get('message')}")
        return reply["result"]

    def sizes(self, app, manifest):
        """{volume: (bytes, files)}, as the sidecar counts them."""
        return self.in_sidecar(self.sidecar(app, manifest), "sizes", app)

    def remove(self, app):
        """The app's containers and volumes, gone; what could not be removed, as messages."""
        leftovers = []
        labels = {"label": [f"mig.grid={self.grid_name}", f"mig.app={app}"]}
        # Containers first: a volume in use cannot go.
        containers = self.client.containers.list(all=True, filters=labels)
        for thing in containers + self.client.volumes.list(filters=labels):
            try:
                thing.remove(force=True)
            except self.errors.NotFound:
                pass
            except self.errors.APIError as e:
                leftovers.append(f"{thing.name}: {e.explanation}")
        return leftovers

    # --- components ---------------------------------------------------------------------

    def component_pid(self, app, component):
        container = self.get(f"{self.prefix(app)}.{component}")
        if container is None:
            return None
        state = container.attrs["State"]
        if state["Restarting"]:
            return 0  # between two runs: the engine starts it again
        return state["Pid"] if state["Running"] and state["Pid"] else None

    def prepare(self, app, manifest, component, command, cwd, env, wait):
        """Create the component's container ahead of its start (start() then only starts
        it); a container runs nothing until started. Returns None: it is ready."""
        self.container(app, manifest, component, command, cwd, env)
        return None

    def start(self, app, manifest, component, command, cwd, env):
        container = self.container(app, manifest, component, command, cwd, env)
        try:
            container.start()
        except self.errors.APIError as e:
            raise AgentError(f"component {component['name']!r} cannot start: {e.explanation}") from None
        return ContainerProcess(container)

    def container(self, app, manifest, component, command, cwd, env):
        """The component's container, made (again, if what it is made from changed)."""
        name = component["name"]
        mounts = self.app_mounts(app, manifest, secrets_read_only=True)
        if reaches := manifest.get("reaches"):
            other = self.grid.manifest(reaches)
            mounts += [
                self.mount(f"{self.grid.app_dir(reaches)}/volumes/{v}", f"{self.prefix(reaches)}.{v}")
                for v in other["volumes"]
            ]
        if component.get("engine"):
            mounts.append(self.mount(self.socket, self.socket, kind="bind"))
        restarts = int(component.get("restarts", 0))
        spec = {
            "image": component.get("image") or self.image,
            "command": command,
            "working_dir": cwd,
            "environment": env,
            "mounts": [dict(m) for m in mounts],
            "restart_policy": {"Name": "on-failure", "MaximumRetryCount": restarts} if restarts else None,
        }
        # Made again when what it is made from changed (an upgraded MIG, another image).
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        full = f"{self.prefix(app)}.{name}"
        container = self.get(full)
        if container is not None and container.labels.get("mig.spec") != digest:
            container.remove(force=True)
            container = None
        if container is None:
            try:
                container = self.client.containers.create(
                    spec["image"],
                    command,
                    name=full,
                    working_dir=cwd,
                    environment=env,
                    mounts=mounts,
                    labels=self.labels(app, "component", **{"mig.component": name, "mig.spec": digest}),
                    init=True,
                    network_mode="host",
                    restart_policy=spec["restart_policy"] or {"Name": "no"},
                )
            except self.errors.ImageNotFound:
                raise AgentError(
                    f"component {name!r}: the image {spec['image']!r} is not on this engine: {IMAGE_HINT}"
                ) from None
        return container

    def stop(self, app, manifest, grace, force):
        """SIGTERM every component's container (a stop, which the engine's restart policy
        leaves alone), wait, then SIGKILL only if forced. Returns the survivors,
        {component: [pid]}."""
        running = {}
        for c in manifest["components"]:
            container = self.get(f"{self.prefix(app)}.{c['name']}")
            if container is not None and container.status in ("running", "restarting"):
                running[c["name"]] = container
        for container in running.values():
            self.signal(container, "SIGTERM")
        survivors = self.wait_stopped(running, grace)
        if survivors and force:
            for container in survivors.values():
                self.signal(container, "SIGKILL")
            survivors = self.wait_stopped(survivors, 5.0)
        return {n: [c.attrs["State"]["Pid"]] for n, c in survivors.items()}

    def signal(self, container, name):
        try:
            container.kill(signal=name)
        except self.errors.APIError:  # it stopped meanwhile
            pass

    def wait_stopped(self, containers, seconds):
        deadline = time.monotonic() + seconds
        # Polled often: the app is down from the signal on, and a migration waits for the end.
        while True:
            for container in containers.values():
                container.reload()
            alive = {n: c for n, c in containers.items() if c.status in ("running", "restarting")}
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.02)

    def log_tail(self, app, component, lines=5):
        container = self.get(f"{self.prefix(app)}.{component}")
        if container is None:
            return ""
        text = container.logs(tail=lines).decode("utf-8", "replace")
        return " | ".join(text.strip().splitlines()[-lines:])
