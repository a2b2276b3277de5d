"""Docker engines of MIG's own on this machine, for the docker demo and the tests: dockerd
processes each with its own data, socket and containerd, and MIG's image loaded into each
(conf/docker/build-image). They need root, as dockerd does."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERD = shutil.which("dockerd") or "/usr/bin/dockerd"


@dataclass
class Engine:
    socket: str
    process: subprocess.Popen
    workdir: Path

    def docker(self, *args, check=True, **kwargs):
        return subprocess.run(
            ["docker", "-H", f"unix://{self.socket}", *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )

    def stop(self, remove=True):
        """Stop the engine (its containers stop with it); with `remove`, remove its state."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_engine(name, data=None, run=None):
    """A dockerd of its own: no bridge network and no firewall rules (containers that must be
    reached use the host's network). Its images and containers are kept in `data`, its socket
    and runtime state in `run`, whose path must be short (containerd's socket paths are
    limited to ~100 bytes); both are new directories of their own unless given (then the
    engine is removed with them when it stops)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"mig-dockerd-{name}-", dir="/tmp"))
    data, run = Path(data or workdir / "data"), Path(run or workdir)
    for path in (data, run):
        path.mkdir(parents=True, exist_ok=True)
    socket = str(run / "docker.sock")
    log_path = run / "dockerd.log"
    log = open(log_path, "ab")
    process = subprocess.Popen(
        [
            DOCKERD,
            "--data-root", str(data),
            "--exec-root", str(run / "exec"),
            "--pidfile", str(run / "dockerd.pid"),
            "--host", f"unix://{socket}",
            "--bridge=none", "--iptables=false", "--ip6tables=false",
            "--ip-forward=false", "--ip-masq=false",
            "--storage-driver=overlay2",
            "--shutdown-timeout=5",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    engine = Engine(socket, process, workdir)
    deadline = time.monotonic() + 60
    while engine.docker("version", check=False).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            said = log_path.read_text(errors="replace")[-2000:]
            engine.stop()
            raise RuntimeError(f"dockerd {name} did not start: {said}")
        time.sleep(0.1)
    return engine


def load_image(engines, image):
    """MIG's image in every engine, built once and cached outside the checkout."""
    result = subprocess.run(
        [str(ROOT / "conf/docker/build-image"), image, *(e.socket for e in engines)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building MIG's image failed:\n{result.stderr[-3000:]}")
