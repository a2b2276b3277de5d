"""Processes on the grid host, told apart from a reused pid by their start time."""

import os


def proc_stat(pid):
    """(state, session id, start time) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()
    return fields[0], int(fields[3]), fields[19]


def have_proc():
    return os.path.isdir("/proc/self")


def pid_alive(pid, start_time=None):
    if have_proc():
        info = proc_stat(pid)
        # A zombie has exited; a different start time means the pid was reused.
        if info is None or info[0] in ("Z", "X"):
            return False
        return start_time is None or info[2] == start_time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def session_members(sid):
    """Every live process in a component's session: the component and what it spawned."""
    if not have_proc():
        return [sid] if pid_alive(sid) else []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = proc_stat(int(entry))
            if info and info[1] == sid and info[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def session_of(pid):
    """The session a component's process is in: its own (a leader), or its dead leader's."""
    info = proc_stat(pid) if have_proc() else None
    return info[1] if info else pid


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
