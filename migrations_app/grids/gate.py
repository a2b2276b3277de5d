"""
MIG's gate: the forced command of MIG's key on a grid whose grid.info says `restricted = true`.

`manage.py grids --authorized-keys GRID` prints the authorized_keys line that runs it:

    restrict,command="PYTHON -c '<loader>' <this file, compressed> PYTHON ROOT" ssh-ed25519 AAAA...

so the grid's host needs no file of MIG's before the key works, and the key can do only
MIG's work on that grid, nothing else (no shell, no forwarding, no SFTP):

- run MIG's agent of this grid: `PYTHON ROOT/.mig/agent-<version>.pyz ROOT ...`;
- send an app's volumes, read-only: `rsync --server --sender <options> . ROOT/apps/APP/volumes/`
  (the options checked against what MIG's helper asks for; no --protect-args, which would
  hide the paths from this gate);
- write a file under ROOT (MIG installs its agent, templates and secrets that way):
  `mig-put PATH MODE`, the data on stdin, every directory on the way a real one.

The agent it lets run starts an app's components, which may run any program: that is MIG's
work. What the gate takes away is everything else the key could do (see DESIGN.md, "Threat
model"). Standard library only: it runs with the grid's Python before anything is installed.
"""

import os
import re
import shlex
import shutil
import sys
import uuid

# Short options, then the protocol's capability letters after "e.". Never -L or -k (the
# sender would follow an app's symlinks out of its volumes), nor -K.
RSYNC_FLAGS = re.compile(r"-[A-JMNOP-Za-jl-z]+(e\.[A-Za-z]+)?")
RSYNC_OPTIONS = re.compile(r"--numeric-ids|--timeout=\d{1,6}|--bwlimit=\d{1,9}")
NAME = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def refuse(command, why):
    shown = command if len(command) <= 100 else command[:99] + "…"
    sys.stderr.write(f"mig-gate: refused {shown!r}: {why}\n")
    return 126


def main(python, root):
    command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    try:
        argv = shlex.split(command)
    except ValueError as e:
        return refuse(command, f"cannot be parsed ({e})")
    if not argv:
        return refuse(command, "this key runs only MIG's commands, no shell")
    agent = re.escape(root) + r"/\.mig/agent-[0-9a-f]{16}\.pyz"
    if len(argv) >= 3 and argv[0] == python and re.fullmatch(agent, argv[1]) and argv[2] == root:
        os.execv(python, argv)
    if argv[:3] == ["rsync", "--server", "--sender"]:
        *options, dot, path = argv[3:] if len(argv) >= 5 else ["", "", ""]
        volumes = re.escape(root) + rf"/apps/{NAME}/volumes/"
        if (
            dot == "."
            and re.fullmatch(volumes, path)
            and all(RSYNC_FLAGS.fullmatch(o) or RSYNC_OPTIONS.fullmatch(o) for o in options)
        ):
            os.execvp("rsync", argv)
        return refuse(command, "rsync may only send an app's volumes, with MIG's options")
    if argv[0] == "mig-put" and len(argv) == 3:
        return put(root, argv[1], argv[2], command)
    return refuse(command, "this key runs only MIG's agent, rsync's sender and mig-put")


def put(root, path, mode, command):
    """Write stdin to `path` (below `root`) atomically, with `mode` (octal)."""
    if not re.fullmatch(r"[0-7]{3,4}", mode) or int(mode, 8) > 0o777:
        return refuse(command, "the mode must be octal, at most 777")
    parts = path.split("/")
    if not path.startswith(root + "/") or os.path.normpath(path) != path or ".." in parts:
        return refuse(command, "the path must be inside the grid's root")
    *directories, name = path[len(root) + 1 :].split("/")
    try:
        os.makedirs(root, 0o755, exist_ok=True)  # MIG's first put comes before the grid's init
        fd = os.open(root, DIRECTORY)
    except OSError as e:
        sys.stderr.write(f"mig-gate: cannot open the grid's root {root}: {e.strerror}\n")
        return 1
    try:
        for directory in directories:  # each one a real directory: a symlink leads nowhere
            try:
                os.mkdir(directory, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            inner = os.open(directory, DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        temporary = f".{name}.{uuid.uuid4().hex}.tmp"
        out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as f:
                os.fchmod(f.fileno(), int(mode, 8))
                shutil.copyfileobj(sys.stdin.buffer, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            os.unlink(temporary, dir_fd=fd)
            raise
    except OSError as e:
        sys.stderr.write(f"mig-gate: cannot write {path}: {e.strerror}\n")
        return 1
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":  # as a file, or as the authorized_keys line runs it: ... PYTHON ROOT
    sys.exit(main(sys.argv[-2], sys.argv[-1]))
