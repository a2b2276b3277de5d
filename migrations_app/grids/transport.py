"""
Transports run commands on a grid host: `local` with subprocess, `ssh` with paramiko.

Commands are argument lists. The SSH transport joins them with shlex quoting, because the
remote side always hands a command line to a shell; nothing else builds command lines.
An SSH transport keeps one connection open until closed, so one operation makes one
connection; use it as a context manager.
"""

import base64
import hashlib
import io
import os
import re
import selectors
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .agent.procs import have_proc, pid_alive, proc_stat
from .errors import AuthError, CommandFailed, CommandTimeout, GridError, HostKeyError, TransportError

CHUNK = 64 * 1024
PIPE_BUFFER = 1 << 20


@dataclass
class Result:
    argv: list
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self):
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self):
        return self.stderr.decode("utf-8", "replace")

    def check(self, where=""):
        if self.returncode != 0:
            tail = self.err.strip().splitlines()[-5:]
            detail = "; ".join(tail) or "no error output"
            raise CommandFailed(
                f"{where}{shlex.join(self.argv[:3])}… exited with status {self.returncode}: {detail}",
                self,
            )
        return self


def _argv(argv):
    argv = [os.fspath(a) for a in argv]
    if not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("a command is a non-empty list of strings")
    if any("\0" in a for a in argv):
        raise ValueError("command arguments cannot contain NUL")
    return argv


def feed_in_background(write, close, data):
    """Write a command's input while its output is read, so neither side blocks the other."""

    def feed():
        try:
            write(data)
            close()
        except OSError:  # the command exited without reading it all; its status says why
            pass

    threading.Thread(target=feed, daemon=True).start()


def rsync_location(host, path):
    """rsync's HOST:PATH; an IPv6 address goes in brackets, or its colons would split it."""
    return f"[{host}]:{path}" if ":" in host else f"{host}:{path}"


class Transport:
    """Runs argument-list commands on one grid host."""

    name = "?"

    def __init__(self, command_timeout=300.0):
        self.command_timeout = command_timeout

    def run(self, argv, *, input=None, timeout=None, check=True):
        """Run a command to completion and return its Result."""
        out, err = bytearray(), bytearray()
        returncode = None
        for kind, data in self._exec(_argv(argv), input, timeout or self.command_timeout):
            if kind == "out":
                out += data
            elif kind == "err":
                err += data
            else:
                returncode = data
        result = Result(list(argv), returncode, bytes(out), bytes(err))
        return result.check(f"{self.name}: ") if check else result

    def stream(self, argv, *, timeout=None):
        """Run a command, yielding its stdout line by line as it arrives.

        Raises CommandFailed at the end if it exited non-zero. `timeout` bounds the
        whole command; None means no limit.
        """
        argv = _argv(argv)
        pending, err = b"", bytearray()
        for kind, data in self._exec(argv, None, timeout):
            if kind == "out":
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            elif kind == "err":
                err += data
            else:
                if pending:
                    yield pending.decode("utf-8", "replace")
                Result(argv, data, b"", bytes(err)).check(f"{self.name}: ")

    def put(self, data, path, mode=0o600):
        """Write `data` to `path` on the host atomically, creating its directory."""
        raise NotImplementedError

    def put_through_gate(self, data, path, mode):
        """put() on a restricted grid, whose key can write files only through MIG's gate."""
        self.run(["mig-put", str(path), f"{mode:o}"], input=data)

    def popen(self, argv):
        """Start a command with pipes to its stdin, stdout and stderr, for streaming data.

        Returns a subprocess.Popen, or an object with the same stdin, stdout, stderr,
        poll(), wait() and kill().
        """
        raise NotImplementedError

    def failure(self, status, stderr):
        """The error a popen()ed command's exit means about the connection, if it is one."""
        return None

    def remote_shell(self, prefix=()):
        """rsync's -e option for reaching this host (see LocalTransport, OpenSSHTransport)."""
        raise GridError(f"{self.name}: rsync cannot run over this transport")

    def rsync_location(self, path):
        raise GridError(f"{self.name}: rsync cannot run over this transport")

    def _exec(self, argv, input, timeout):
        """Yield ("out", bytes), ("err", bytes) as they arrive, then ("exit", status)."""
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalTransport(Transport):
    name = "local"

    def _exec(self, argv, input, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as e:
            raise CommandFailed(f"local: cannot run {argv[0]}: {e.strerror}") from None
        sel = selectors.DefaultSelector()
        try:
            if input is not None:
                feed_in_background(proc.stdin.write, proc.stdin.close, input)
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            while sel.get_map():
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise CommandTimeout(f"local: {argv[0]} did not finish in {timeout:g}s")
                for key, _ in sel.select(wait):
                    data = os.read(key.fileobj.fileno(), CHUNK)
                    if data:
                        yield key.data, data
                    else:
                        sel.unregister(key.fileobj)
            returncode = proc.wait()
        finally:
            # Also reached when the caller stops reading early: never leave the command behind.
            sel.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()
        yield "exit", returncode

    def remote_shell(self, prefix=()):
        """rsync's -e for a sender on this host: None, it runs here; with `prefix`, the
        command (a container's `exec`, say) that rsync's "HOST" is appended to."""
        return shlex.join(prefix) if prefix else None

    def rsync_location(self, path):
        """rsync's SRC for `path` on this host."""
        return path

    def popen(self, argv):
        # A large read buffer: these pipes carry file data, in 64 KiB blocks.
        return subprocess.Popen(
            _argv(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=PIPE_BUFFER,
        )

    def put(self, data, path, mode=0o600):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def fingerprint(key):
    """OpenSSH-style SHA256 fingerprint of a paramiko key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_private_key(path):
    """Load the SSH private key, refusing a file that others can read."""
    import paramiko

    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AuthError(f"private key {path} does not exist") from None
    except OSError as e:
        raise AuthError(f"private key {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise AuthError(f"private key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise AuthError(
            f"private key {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "run: chmod 600 " + shlex.quote(str(path))
        )
    try:
        return paramiko.PKey.from_path(path)
    except (paramiko.SSHException, OSError, ValueError) as e:
        raise AuthError(f"private key {path} cannot be loaded: {e}") from None


def parse_host_key(host_key):
    import paramiko

    kind, data = host_key.split()[:2]
    try:
        return paramiko.PKey.from_type_string(kind, base64.b64decode(data))
    except (paramiko.SSHException, ValueError) as e:
        raise HostKeyError(f"pinned host key cannot be parsed: {e}") from None


def known_hosts_name(host, port):
    return host if port == 22 else f"[{host}]:{port}"


class SSHTransport(Transport):
    """Runs commands over one pinned-host-key SSH connection (paramiko)."""

    name = "ssh"

    def __init__(
        self,
        host,
        port,
        user,
        host_key,
        key_file,
        connect_timeout=10.0,
        command_timeout=300.0,
        restricted=False,
    ):
        super().__init__(command_timeout)
        self.host, self.port, self.user = host, port, user
        self.host_key = host_key
        self.restricted = restricted
        self.key_file = Path(key_file)
        self.connect_timeout = connect_timeout
        self.name = f"ssh {user}@{host}:{port}"
        self._client = None

    def _connect(self):
        import paramiko

        if self._client is not None and self._client.get_transport().is_active():
            return self._client
        pkey = load_private_key(self.key_file)
        pinned = parse_host_key(self.host_key)
        where = self.name

        class PinnedKeyPolicy(paramiko.MissingHostKeyPolicy):
            # Reached when the host offers a key of another type than the pinned one.
            def missing_host_key(self, client, hostname, key):
                raise HostKeyError(
                    f"{where}: host key not recognised: the host offered {key.get_name()} "
                    f"{fingerprint(key)}, grid.info pins {pinned.get_name()} {fingerprint(pinned)}; "
                    "refusing to connect"
                )

        client = paramiko.SSHClient()
        client.get_host_keys().add(known_hosts_name(self.host, self.port), pinned.get_name(), pinned)
        client.set_missing_host_key_policy(PinnedKeyPolicy())
        try:
            client.connect(
                self.host,
                self.port,
                username=self.user,
                pkey=pkey,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as e:
            client.close()
            raise HostKeyError(
                f"{where}: HOST KEY MISMATCH: the host offered {e.key.get_name()} "
                f"{fingerprint(e.key)}, grid.info pins {e.expected_key.get_name()} "
                f"{fingerprint(e.expected_key)}; refusing to connect"
            ) from None
        except HostKeyError:
            client.close()
            raise
        except paramiko.AuthenticationException as e:
            client.close()
            raise AuthError(f"{where}: the host refused key {self.key_file}: {e}") from None
        except TimeoutError:
            client.close()
            raise TransportError(
                f"{where}: no answer within {self.connect_timeout:g}s (host unreachable?)"
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as e:
            client.close()
            raise TransportError(f"{where}: cannot connect: {e}") from None
        self._client = client
        return client

    def _exec(self, argv, input, timeout):
        import paramiko

        client = self._connect()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            chan = client.get_transport().open_session(timeout=self.connect_timeout)
            chan.exec_command(shlex.join(argv))
        except (OSError, EOFError, paramiko.SSHException) as e:
            self.close()
            raise TransportError(f"{self.name}: cannot start {argv[0]}: {e}") from None
        sel = selectors.DefaultSelector()
        try:
            if input is None:
                chan.shutdown_write()
            else:
                feed_in_background(chan.sendall, chan.shutdown_write, input)
            sel.register(chan, selectors.EVENT_READ)
            while True:
                progressed = False
                while chan.recv_ready():
                    yield "out", chan.recv(CHUNK)
                    progressed = True
                while chan.recv_stderr_ready():
                    yield "err", chan.recv_stderr(CHUNK)
                    progressed = True
                if progressed:
                    continue
                if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    break
                if chan.closed or not client.get_transport().is_active():
                    raise TransportError(f"{self.name}: connection lost while running {argv[0]}")
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    raise CommandTimeout(f"{self.name}: {argv[0]} did not finish in {timeout:g}s")
                sel.select(wait)
            yield "exit", chan.recv_exit_status()
        except OSError as e:
            self.close()
            raise TransportError(f"{self.name}: connection lost: {e}") from None
        finally:
            sel.close()
            chan.close()

    def popen(self, argv):
        import paramiko

        client = self._connect()
        try:
            chan = client.get_transport().open_session(timeout=self.connect_timeout)
            chan.exec_command(shlex.join(_argv(argv)))
        except (OSError, EOFError, paramiko.SSHException) as e:
            self.close()
            raise TransportError(f"{self.name}: cannot start {argv[0]}: {e}") from None
        return ChannelProcess(chan)

    def failure(self, status, stderr):
        # A channel that closed without an exit status: the connection went.
        if status == -1:
            self.close()
            return TransportError(f"{self.name}: connection lost")
        return None

    def put(self, data, path, mode=0o600):
        import paramiko

        if self.restricted:
            return self.put_through_gate(data, path, mode)
        client = self._connect()
        path = str(path)
        directory = os.path.dirname(path)
        tmp = f"{directory}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
        try:
            sftp_session = client.open_sftp()
        except paramiko.SSHException as e:
            raise GridError(
                f"{self.name}: no SFTP ({e}): MIG writes its files over SFTP; enable it in the host's "
                "sshd_config ('Subsystem sftp internal-sftp'), or make the grid restricted (see "
                "`manage.py grids --authorized-keys`)"
            ) from None
        try:
            with sftp_session as sftp:
                sftp_makedirs(sftp, directory)
                # Create the file with its final mode before any secret is written into it.
                with sftp.open(tmp, "wx") as f:
                    f.chmod(mode)
                    f.set_pipelined(True)
                    f.write(data)
                sftp.posix_rename(tmp, path)
        except OSError as e:
            self.run(["rm", "-f", "--", tmp], check=False)
            raise TransportError(f"{self.name}: cannot write {path}: {e}") from None

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None


def cpu_has_aes():
    """Whether this CPU encrypts AES in hardware (x86 `aes` flag, ARM `aes` feature)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


# OpenSSH prefers ChaCha20, the fastest cipher without AES instructions. With them,
# AES-GCM moves bulk data about 1.5x faster, which is the helper's whole job.
CIPHERS_WITH_AES = (
    "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,"
    "aes128-ctr,aes192-ctr,aes256-ctr"
)


def sftp_makedirs(sftp, directory):
    """`mkdir -p` over SFTP: no shell, so no login scripts to wait for."""
    try:
        sftp.stat(directory)
    except FileNotFoundError:
        parent = os.path.dirname(directory)
        if parent != directory:
            sftp_makedirs(sftp, parent)
        try:
            sftp.mkdir(directory, 0o755)
        except OSError:
            sftp.stat(directory)  # made meanwhile by someone else: fine; otherwise say why


class ChannelReader(io.RawIOBase):
    """One of a channel's output streams (`recv`: its stdout's or stderr's) as a raw file."""

    def __init__(self, recv):
        self._recv = recv

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self._recv(len(buffer))  # b"" once the channel is closed: end of file
        buffer[: len(data)] = data
        return len(data)


class ChannelWriter(io.RawIOBase):
    """A channel's stdin as a raw file; closing it sends end of file."""

    def __init__(self, chan):
        self._chan = chan

    def writable(self):
        return True

    def write(self, data):
        self._chan.sendall(bytes(data))
        return len(data)

    def close(self):
        if not self.closed:
            try:
                self._chan.shutdown_write()
            finally:
                super().close()


class ChannelProcess:
    """A command on an SSH channel, with the part of subprocess.Popen that streaming uses.

    Its streams are io's, not paramiko's makefile()s: those flush again in __del__, and when
    the garbage collector takes one in the same cycle as its buffer, that second flush
    prints a traceback to stderr ("Exception ignored in BufferedFile.__del__").
    """

    def __init__(self, chan):
        self.chan = chan
        self.stdin = ChannelWriter(chan)
        self.stdout = io.BufferedReader(ChannelReader(chan.recv), PIPE_BUFFER)
        self.stderr = io.BufferedReader(ChannelReader(chan.recv_stderr))
        self.returncode = None

    def poll(self):
        if self.returncode is None and self.chan.exit_status_ready():
            self.returncode = self.chan.recv_exit_status()
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if not self.chan.status_event.wait(timeout):
                raise subprocess.TimeoutExpired("ssh channel", timeout)
            self.returncode = self.chan.recv_exit_status()
        return self.returncode

    def kill(self):
        self.chan.close()


class OpenSSHTransport(LocalTransport):
    """SSH through the OpenSSH client, for the helper (grid hosts have no paramiko).

    The host key is pinned in a known_hosts file of its own, with strict checking; one
    master connection is shared by every command and by rsync (ControlMaster).
    """

    def __init__(
        self,
        host,
        port,
        user,
        host_key,
        key_file,
        connect_timeout=10.0,
        command_timeout=300.0,
        restricted=False,
    ):
        super().__init__(command_timeout)
        self.host, self.port, self.user = host, port, user
        self.restricted = restricted
        self.name = f"ssh {user}@{host}:{port}"
        self.control_dir = control_dir()
        known_hosts = os.path.join(self.control_dir, "known_hosts")
        with open(known_hosts, "w") as f:
            f.write(f"{known_hosts_name(host, port)} {host_key}\n")
        self.ssh_argv = [
            "ssh",
            "-i",
            str(key_file),
            "-p",
            str(port),
            "-l",
            user,
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            f"ConnectTimeout={int(connect_timeout)}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={self.control_dir}/%C",
            "-o",
            "ControlPersist=60",
            "-o",
            "LogLevel=ERROR",
        ]
        if cpu_has_aes():
            self.ssh_argv += ["-o", f"Ciphers={CIPHERS_WITH_AES}"]

    def remote_shell(self, prefix=()):
        """rsync's -e for a sender on this host: ssh, to which rsync appends the host; with
        `prefix`, ssh to this host running that command, to which rsync appends its "HOST"
        (a container, say)."""
        return shlex.join([*self.ssh_argv, self.host, "--", *prefix] if prefix else self.ssh_argv)

    def rsync_location(self, path):
        return rsync_location(self.host, path)

    def popen(self, argv):
        return super().popen([*self.ssh_argv, self.host, "--", shlex.join(_argv(argv))])

    def _exec(self, argv, input, timeout):
        full = [*self.ssh_argv, self.host, "--", shlex.join(argv)]
        err = bytearray()
        for kind, data in super()._exec(full, input, timeout):
            if kind == "err":
                err += data
            if kind == "exit" and (error := self.failure(data, err)):
                raise error
            yield kind, data

    def failure(self, status, stderr):
        # ssh itself exits 255 when it cannot connect; a remote command's status is its own.
        if status != 255:
            return None
        detail = stderr.decode("utf-8", "replace").strip()
        if "Host key verification failed" in detail or "IDENTIFICATION HAS CHANGED" in detail:
            return HostKeyError(f"{self.name}: host key does not match the pinned key: {detail}")
        return TransportError(f"{self.name}: {detail or 'ssh failed'}")

    def put(self, data, path, mode=0o600):
        if self.restricted:
            return self.put_through_gate(data, path, mode)
        path = str(path)
        directory = os.path.dirname(path)
        tmp = f"{directory}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
        q = shlex.quote
        script = (
            f"umask 077 && mkdir -p -- {q(directory)} && cat > {q(tmp)} && chmod {mode:o} {q(tmp)} "
            f"&& mv -f -- {q(tmp)} {q(path)} || {{ rm -f -- {q(tmp)}; exit 1; }}"
        )
        self.run(["sh", "-c", script], input=data)

    def close(self):
        subprocess.run(
            [*self.ssh_argv, "-O", "exit", self.host],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        shutil.rmtree(self.control_dir, ignore_errors=True)


# A control directory's name: mig-ssh-<its process's pid>-<that process's start time>-<random>.
CONTROL_DIR_RE = re.compile(r"mig-ssh-(\d+)-(\d+)-")


def control_dir() -> str:
    """A private directory for an OpenSSH transport's master socket and known_hosts.

    Socket paths are limited to ~100 bytes, so it lives in the temporary directory, not
    the helper's work directory. A helper killed outright cannot remove its own: each new
    one removes those of this user whose process has ended (the name says which process;
    its start time tells a reused pid apart).
    """
    base = tempfile.gettempdir()
    with os.scandir(base) as entries:
        for entry in entries:
            if (match := CONTROL_DIR_RE.match(entry.name)) is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            mine = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            if mine and not pid_alive(int(match[1]), match[2]):
                shutil.rmtree(entry.path, ignore_errors=True)
    pid = os.getpid()
    started = proc_stat(pid)[2] if have_proc() else "0"
    return tempfile.mkdtemp(prefix=f"mig-ssh-{pid}-{started}-", dir=base)


def open_transport(grid, key_file, ssh_client="paramiko"):
    """The transport a grid's config asks for; connects lazily on first use.

    MIG uses paramiko; the helper asks for the OpenSSH client, which rsync needs anyway.
    """
    if grid.transport == "local":
        return LocalTransport(grid.command_timeout)
    transport = OpenSSHTransport if ssh_client == "openssh" else SSHTransport
    return transport(
        grid.host,
        grid.port,
        grid.user,
        grid.host_key,
        key_file,
        grid.connect_timeout,
        grid.command_timeout,
        grid.restricted,
    )
