"""Transports against a real OpenSSH server: pinned host keys, private keys, timeouts."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from migrations_app.grids import AuthError, CommandTimeout, HostKeyError, TransportError, gridinfo, open_grid
from migrations_app.grids.transport import LocalTransport, OpenSSHTransport, SSHTransport

from .sshd import free_port, keygen


def ssh(host, key, **overrides):
    options = {
        "host": host.address,
        "port": host.port,
        "user": host.user,
        "host_key": host.host_key,
        "key_file": key,
        "connect_timeout": 5,
    }
    options.update(overrides)
    return SSHTransport(**options)


def openssh(host, key, **overrides):
    options = {"host": host.address, "port": host.port, "user": host.user, "host_key": host.host_key}
    options.update(overrides)
    return OpenSSHTransport(key_file=key, connect_timeout=5, **options)


@pytest.fixture(params=["local", "ssh", "openssh"])
def transport(request, client_key):
    """Each transport: subprocess, paramiko (MIG), and the OpenSSH client (the helper)."""
    if request.param == "local":
        yield LocalTransport()
        return
    make = ssh if request.param == "ssh" else openssh
    with make(request.getfixturevalue("ssh_hosts")[0], client_key) as t:
        yield t


def test_stdout_stderr_and_status_kept_apart(transport):
    result = transport.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (result.returncode, result.out, result.err) == (3, "out\n", "err\n")


def test_arguments_are_never_interpreted_by_a_shell(transport, tmp_path):
    marker = tmp_path / "pwned"
    tricky = ["; touch " + str(marker), "$(touch " + str(marker) + ")", "`id`", "a b", "'\"", "*"]
    result = transport.run(["printf", "%s\\n", *tricky])
    assert result.out.splitlines() == tricky
    assert not marker.exists()


def test_failure_raises_with_stderr(transport):
    with pytest.raises(Exception, match="exited with status 2: no such thing"):
        transport.run(["sh", "-c", "echo no such thing >&2; exit 2"])


def test_input_is_passed(transport):
    assert transport.run(["cat"], input=b"x" * 300_000).stdout == b"x" * 300_000


def test_stream_yields_lines_as_they_come(transport):
    seen = []
    for line in transport.stream(["sh", "-c", "echo one; sleep 0.5; echo two"]):
        seen.append((line, time.monotonic()))
    assert [line for line, _ in seen] == ["one", "two"]
    assert seen[1][1] - seen[0][1] >= 0.4  # the first line arrived before the command ended


def test_command_timeout(transport):
    start = time.monotonic()
    with pytest.raises(CommandTimeout, match="did not finish in 0.5s"):
        transport.run(["sleep", "10"], timeout=0.5)
    assert time.monotonic() - start < 3


def test_put_is_atomic_and_private(transport, tmp_path):
    target = tmp_path / "deep" / "dir" / "secret"
    transport.put(b"first", str(target))
    transport.put(b"second", str(target), mode=0o640)
    assert target.read_bytes() == b"second"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["secret"]  # no temporary left


def test_one_connection_per_operation(ssh_hosts, client_key):
    with ssh(ssh_hosts[0], client_key) as t:
        t.run(["true"])
        first = t._client.get_transport()
        t.run(["true"])
        t.put(b"x", "/tmp/mig-transport-test")
        assert t._client.get_transport() is first
    assert t._client is None


def test_wrong_host_key_is_refused_with_both_fingerprints(ssh_hosts, client_key, tmp_path):
    a, b = ssh_hosts
    root = tmp_path / "grid"
    table = a.grid_table(root).replace(a.host_key, b.host_key)
    grid = open_grid(gridinfo.parse("[grids.east]\n" + table)["east"], client_key)
    with pytest.raises(HostKeyError) as refused:
        grid.init()
    message = str(refused.value)
    assert "HOST KEY MISMATCH" in message and "refusing to connect" in message
    assert message.count("SHA256:") == 2
    assert not root.exists()  # nothing ran


def test_unknown_key_type_is_refused(ssh_hosts, client_key, tmp_path):
    other = keygen(tmp_path / "ecdsa", "other", kind="ecdsa")
    kind, data = Path(f"{other}.pub").read_text().split()[:2]
    with pytest.raises(HostKeyError, match="offered ssh-ed25519 SHA256:.*pins ecdsa-sha2-nistp256 SHA256:"):
        ssh(ssh_hosts[0], client_key, host_key=f"{kind} {data}").run(["true"])


def test_world_readable_key_is_refused(ssh_hosts, client_key, tmp_path):
    loose = tmp_path / "loose_key"
    shutil.copy(client_key, loose)
    os.chmod(loose, 0o644)
    with pytest.raises(AuthError, match=r"readable by others \(mode 0644\); run: chmod 600"):
        ssh(ssh_hosts[0], loose).run(["true"])


def test_unknown_client_key_is_refused(ssh_hosts, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(AuthError, match="the host refused key"):
        ssh(ssh_hosts[0], stranger).run(["true"])


def test_missing_key_file(ssh_hosts, tmp_path):
    with pytest.raises(AuthError, match="does not exist"):
        ssh(ssh_hosts[0], tmp_path / "nope").run(["true"])


def test_closed_port_is_answered_at_once(ssh_hosts, client_key):
    port = free_port(ssh_hosts[0].address)
    start = time.monotonic()
    with pytest.raises(TransportError, match="cannot connect"):
        ssh(ssh_hosts[0], client_key, port=port).run(["true"])
    assert time.monotonic() - start < 2


def test_silent_host_is_answered_within_the_timeout(ssh_hosts, client_key):
    # A real listener that accepts connections and never speaks: what a hung host looks like.
    listener = socket.create_server((ssh_hosts[0].address, 0))
    accepted = []

    def accept():
        try:
            accepted.append(listener.accept())
        except OSError:  # closed at the end of the test before this thread got to accept
            pass

    threading.Thread(target=accept, daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(TransportError):
            ssh(ssh_hosts[0], client_key, port=listener.getsockname()[1], connect_timeout=1).run(["true"])
        assert time.monotonic() - start < 4
    finally:
        listener.close()


def test_openssh_refuses_a_wrong_host_key(ssh_hosts, client_key, tmp_path):
    a, b = ssh_hosts
    marker = tmp_path / "ran"
    with (
        openssh(a, client_key, host_key=b.host_key) as t,
        pytest.raises(HostKeyError, match="does not match"),
    ):
        t.run(["touch", str(marker)])
    assert not marker.exists()


def test_openssh_reuses_one_master_connection(ssh_hosts, client_key):
    with openssh(ssh_hosts[0], client_key) as t:
        t.run(["true"])
        sockets = os.listdir(t.control_dir)
        t.run(["true"])
        assert [s for s in os.listdir(t.control_dir) if s != "known_hosts"] == [
            s for s in sockets if s != "known_hosts"
        ]
        assert len(sockets) == 2  # known_hosts and the master's socket
    assert not os.path.exists(t.control_dir)


def test_a_killed_helpers_control_directory_is_removed_by_the_next(
    ssh_hosts, client_key, tmp_path, monkeypatch
):
    # A helper killed outright (kill -9, its host's OOM killer) cannot remove its OpenSSH
    # control directory; the next transport made on that host removes it, and only it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = ssh_hosts[0]
    code = (
        "import sys\nfrom migrations_app.grids.transport import OpenSSHTransport\n"
        f"with OpenSSHTransport({host.address!r}, {host.port}, {host.user!r}, {host.host_key!r}, "
        f"{str(client_key)!r}) as t:\n    print(t.control_dir, flush=True)\n    sys.stdin.read()"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def helper():
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        return proc, proc.stdout.readline().strip()

    killed, killed_dir = helper()
    running, running_dir = helper()
    try:
        killed.kill()
        killed.wait()
        not_ours = tmp_path / "mig-ssh-1-1-somebody"  # a name alone proves nothing
        not_ours.symlink_to(running_dir)
        with openssh(host, client_key) as t:
            assert os.path.isdir(t.control_dir)
            assert not os.path.exists(killed_dir)
            assert os.path.isfile(os.path.join(running_dir, "known_hosts"))
            assert not_ours.is_symlink()
    finally:
        running.communicate("")
    assert not os.path.exists(running_dir)  # closed as a helper closes it: by its own exit


def test_a_started_command_streams_both_ways(transport):
    proc = transport.popen(["sh", "-c", 'while read -r line; do echo "got $line"; done; echo bye >&2'])
    proc.stdin.write(b"one\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"got one\n"
    proc.stdin.write(b"two\n")
    proc.stdin.close()  # end of its input: it ends
    assert proc.stdout.read() == b"got two\n"
    assert proc.stderr.read() == b"bye\n"
    assert proc.wait(10) == 0
