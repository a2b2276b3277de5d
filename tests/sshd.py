"""Real OpenSSH servers on loopback addresses, for tests and benchmarks."""

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
# The interpreter grid hosts run the agent and helper with. The real binary, not a version
# manager's shim, which costs 50 ms a call on the CI machines (pyenv).
GRID_PYTHON = os.path.realpath(sys.executable)


def keygen(path, comment="mig-test", kind="ed25519"):
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    os.chmod(path, 0o600)
    return Path(path)


def free_port(address):
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@dataclass
class SSHHost:
    address: str
    port: int
    user: str
    host_key: str  # "ssh-ed25519 AAAA...", as grid.info pins it
    process: subprocess.Popen
    workdir: Path

    def grid_table(self, root, app_port=8080, **extra):
        """A [grids.NAME] table for a hostgrid grid on this host."""
        lines = [
            'driver = "hostgrid"',
            f'python = "{GRID_PYTHON}"',
            'transport = "ssh"',
            f'host = "{self.address}"',
            f"port = {self.port}",
            f'user = "{self.user}"',
            f'host_key = "{self.host_key}"',
            f'root = "{root}"',
            f'app_url = "http://{self.address}:{app_port}/"',
        ]
        lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def crash(self):
        """kill -9 this sshd and every connection it serves, as a host whose sshd died."""
        for pid in [self.process.pid, *sshd_descendants(self.process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def restart(self):
        """Start it again, on the same address and port, with the same host key."""
        self.process = launch(self.workdir, self.address, self.port)


def start_sshd(workdir, address, client_public_key, sftp=True):
    """Start sshd on `address` (a loopback address) with its own host key (and SFTP, unless
    not: some hosts have none)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = keygen(workdir / "host_ed25519", f"host-{address}")
    authorized = workdir / "authorized_keys"
    authorized.write_text(Path(client_public_key).read_text())
    os.chmod(authorized, 0o600)
    port = free_port(address)
    user = getpass.getuser()
    config = workdir / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"ListenAddress {address}:{port}",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {workdir / 'sshd.pid'}",
                f"AllowUsers {user}",
                "StrictModes no",
                "UsePAM no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "MaxStartups 200",
                "MaxSessions 100",
                "LogLevel ERROR",
                *(["Subsystem sftp internal-sftp"] if sftp else []),
                "",
            ]
        )
    )
    public = (workdir / "host_ed25519.pub").read_text().split()
    return SSHHost(address, port, user, f"{public[0]} {public[1]}", launch(workdir, address, port), workdir)


def launch(workdir, address, port):
    """Run sshd with the config in `workdir`; returns once it answers."""
    if os.geteuid() == 0:
        # sshd's privilege separation directory; Debian creates it only at boot.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    process = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(workdir / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "sshd.log", "ab"),
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {(workdir / 'sshd.log').read_text()}")
        try:
            with socket.create_connection((address, port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"sshd on {address}:{port} did not answer")


def sshd_descendants(pid):
    """The sshd processes `pid` forked, one per connection, and theirs: its connections."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                data = (entry / "stat").read_text()
            except OSError:
                continue
            name, fields = data[data.index("(") + 1 : data.rindex(")")], data.rsplit(")", 1)[1].split()
            parents[int(entry.name)], names[int(entry.name)] = int(fields[1]), name
    found, frontier = [], {pid}
    while frontier:
        frontier = {
            child for child, parent in parents.items() if parent in frontier and names[child] == "sshd"
        }
        found += frontier
    return found
