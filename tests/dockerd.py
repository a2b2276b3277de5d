"""Real Docker engines for tests and benchmarks: dockerd processes of their own, each with its
own data, socket and containerd, and MIG's image loaded into each (conf/docker/build-image)."""

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
IMAGE = "mig:test"


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

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_engine(number):
    """A dockerd of its own: no bridge network and no firewall rules (containers that must be
    reached use the host's network), state in a short private directory (containerd's socket
    paths are limited to ~100 bytes)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"mig-dockerd{number}-", dir="/tmp"))
    socket = str(workdir / "docker.sock")
    log = open(workdir / "dockerd.log", "wb")
    process = subprocess.Popen(
        [
            DOCKERD,
            "--data-root", str(workdir / "data"),
            "--exec-root", str(workdir / "exec"),
            "--pidfile", str(workdir / "dockerd.pid"),
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
            engine.stop()
            tail = (workdir / "dockerd.log").read_text(errors="replace")[-2000:] if workdir.exists() else ""
            raise RuntimeError(f"dockerd {number} did not start: {tail}")
        time.sleep(0.1)
    return engine


def load_image(engines):
    """MIG's image in every engine, built once and cached outside the checkout."""
    result = subprocess.run(
        [str(ROOT / "conf/docker/build-image"), IMAGE, *(e.socket for e in engines)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building MIG's image failed:\n{result.stderr[-3000:]}")
