"""
The tree-sync protocol, both sides of it: how an app's volumes are listed, hashed and sent
block by block, and how the other side reads what it is sent.

The helper copies with rsync while the app runs; this protocol serves the final pass, after
the app stopped, and the verification (see helper/sync.py, which drives it):

    scan     the source's agent lists every entry of the app's volumes, one `Entry` per
             line (with `hashes`, a file's block hashes and digest too);
    deltas   the source's agent reads requests, one per line (a path and the block hashes
             the copy has of it), and answers with the blocks that differ.

A file is hashed in blocks of BLOCK bytes (sha256, cut to HASH_BYTES); its digest is the
sha256 of its block hashes, so either side can compute it from blocks it already hashed,
without reading the file twice.

The app shaped the trees, and any name in them may be a symlink to anywhere, or become one
at any moment while the app runs. So nothing under them is reached by a path the kernel
resolves: each directory on the way is opened with O_NOFOLLOW, and the last name is used
relative to its directory's descriptor, without following it.

Standard library only: this module runs in the grid's agent, on grid hosts that have only
Python.
"""

import enum
import errno
import fcntl
import hashlib
import itertools
import json
import os
import stat
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

BLOCK = 64 * 1024
HASH_BYTES = 16
ZEROS = bytes(BLOCK)


class SyncError(Exception):
    """The other side of the protocol failed, or answered what the protocol does not allow."""


# --- paths under an app's volumes: no symlink followed -----------------------------------

DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What opening a path whose directories are not all real directories fails with.
NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def not_there(error):
    """Whether an OSError means the path is gone, or leads through something not a directory."""
    return isinstance(error, OSError) and error.errno in NOT_THERE


class parent_dir:
    """`with parent_dir(base, rel) as (fd, name)`: the directory holding `rel` under `base`,
    opened one real directory at a time; OSError (see NOT_THERE) where one is not."""

    def __init__(self, base, rel):
        *self.dirs, self.name = rel.split("/")
        self.base = base
        self.fd = None

    def open(self):
        self.fd = os.open(self.base, DIRECTORY)
        try:
            for name in self.dirs:
                inner = os.open(name, DIRECTORY, dir_fd=self.fd)
                os.close(self.fd)
                self.fd = inner
        except BaseException:
            self.close()
            raise
        return self.fd, self.name

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


def open_regular(name, dir_fd, flags=os.O_RDONLY, mode=0o600):
    """A regular file `name` in the directory `dir_fd`, opened without following a symlink
    (and without blocking on a fifo), as a file object. FileNotFoundError if it is not a
    regular file."""
    # Look before opening: opening a device may do something by itself (a tape rewinds).
    try:
        found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        if not stat.S_ISREG(found.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a regular file", name)
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the look and the open
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "not a regular file", name)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+b" if flags & os.O_RDWR else "wb" if flags & os.O_WRONLY else "rb")


def leaf_path(dir_fd, name):
    """A path to `name` in `dir_fd` for the calls that take no descriptor (the xattr ones):
    through /proc, so no directory on the way is looked up again. Use it only with
    follow_symlinks=False."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def tree_entries(base):
    """(relative path, lstat, descriptor of its directory, name) of everything under `base`,
    depth first, names sorted at each level: the order of sort_key(), which both sides share.
    The descriptor is good until the next entry is taken. Only real directories are entered.
    Memory stays flat: one listing per directory level at a time."""
    try:
        root = os.open(base, DIRECTORY)
    except FileNotFoundError:
        return
    stack = [("", root, iter(sorted(os.listdir(root))))]
    try:
        while stack:
            rel_dir, fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(fd)
                stack.pop()
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:  # removed while the app runs
                continue
            yield rel, st, fd, name
            if stat.S_ISDIR(st.st_mode) and (inner := open_subdir(fd, name)) is not None:
                stack.append((rel, inner, iter(sorted(os.listdir(inner)))))
    finally:
        for _, fd, _ in stack:
            os.close(fd)


def open_subdir(dir_fd, name) -> int | None:
    """The directory `name` in `dir_fd`, opened with no symlink followed; None if it was
    removed, or replaced by a symlink, while the app runs."""
    try:
        return os.open(name, DIRECTORY, dir_fd=dir_fd)
    except OSError as e:
        if not_there(e):
            return None
        raise


def sort_key(rel):
    """The order tree_entries() yields paths in: depth-first, names sorted at each level."""
    return rel.split("/")


def order_key(rel) -> bytes:
    """sort_key() as bytes, for a database to order by: the names joined by a byte no name
    holds, lower than any other, so that byte order is sort_key()'s order."""
    return rel.replace("/", "\0").encode("utf-8", "surrogatepass")


# --- entries ----------------------------------------------------------------------------


class Kind(enum.StrEnum):
    FILE = "f"
    DIRECTORY = "d"
    SYMLINK = "l"
    FIFO = "p"
    SOCKET = "s"
    CHAR_DEVICE = "c"
    BLOCK_DEVICE = "b"


KINDS = {
    stat.S_IFREG: Kind.FILE,
    stat.S_IFDIR: Kind.DIRECTORY,
    stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFSOCK: Kind.SOCKET,
    stat.S_IFCHR: Kind.CHAR_DEVICE,
    stat.S_IFBLK: Kind.BLOCK_DEVICE,
}
# The file type of each kind that is neither a file, a directory nor a symlink.
SPECIAL = {v: k for k, v in KINDS.items() if v in ("p", "s", "c", "b")}
# Extended attributes a copy keeps and verify compares: every namespace but security.*,
# whose labels belong to the host's policy. POSIX ACLs are system.posix_acl_* attributes.
XATTR_SKIPPED = ("security.",)


@dataclass(slots=True)
class Entry:
    """A file system entry as both sides of a copy describe it."""

    path: str  # relative to the volumes directory
    kind: Kind
    mode: int  # permission bits
    uid: int
    gid: int
    mtime_ns: int
    size: int | None = None  # files
    allocated: int | None = None  # files: bytes the file system holds for it (sparse: fewer)
    link: str | None = None  # symlinks: the target, never followed
    rdev: int | None = None  # devices
    xattrs: dict[str, str] = field(default_factory=dict)  # name: value as hex
    inode: str | None = None  # files with more than one name: "device:inode"
    nlink: int | None = None  # likewise: how many names
    digest: str | None = None  # hashed files, and the end of a file sent
    blocks: bytes | None = None  # hashed files: the block hashes, HASH_BYTES each
    # files: the change time, which every change sets and no program can set back (hashed
    # files: once read); each side's own, never compared
    ctime_ns: int | None = field(default=None, compare=False)
    # The line it was read from (from_wire): a listing kept as it came costs no encoding.
    wire: str | None = field(default=None, compare=False, repr=False)

    # On the wire, one letter per field: a listing of millions of entries stays small.
    WIRE = {
        "path": "p",
        "kind": "k",
        "mode": "m",
        "uid": "u",
        "gid": "g",
        "mtime_ns": "t",
        "size": "s",
        "allocated": "a",
        "link": "l",
        "rdev": "r",
        "xattrs": "x",
        "inode": "i",
        "nlink": "n",
        "digest": "d",
        "blocks": "b",
        "ctime_ns": "c",
    }
    FROM_WIRE = {key: name for name, key in WIRE.items()}

    def to_wire(self) -> str:
        data = {}
        for name, key in self.WIRE.items():
            value = getattr(self, name)
            if value is None or (name == "xattrs" and not value):
                continue
            data[key] = value.hex() if name == "blocks" else value
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_wire(cls, text: str | bytes) -> "Entry":
        data = json.loads(text)
        if not isinstance(data, dict) or "p" not in data:
            raise SyncError(f"not an entry: {str(text)[:200]}")
        names = cls.FROM_WIRE
        fields = {names[key]: value for key, value in data.items() if key in names}
        fields["kind"] = Kind(fields["kind"])
        if "blocks" in fields:
            fields["blocks"] = bytes.fromhex(fields["blocks"])
        line = text.decode() if isinstance(text, bytes) else text
        return cls(**fields, wire=line.rstrip("\n"))

    @classmethod
    def of(cls, rel, st, dir_fd, name) -> "Entry":
        """The entry `name` in the directory `dir_fd` is (at `rel`), from its lstat `st`.
        FileNotFoundError if it changed kind while it was described."""
        kind = KINDS[stat.S_IFMT(st.st_mode)]
        entry = cls(rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
        if kind == Kind.FILE:
            entry.size, entry.allocated, entry.ctime_ns = st.st_size, st.st_blocks * 512, st.st_ctime_ns
            if st.st_nlink > 1:
                entry.inode, entry.nlink = f"{st.st_dev}:{st.st_ino}", st.st_nlink
        elif kind == Kind.SYMLINK:
            try:
                entry.link = os.readlink(name, dir_fd=dir_fd)
            except OSError as e:
                if e.errno == errno.EINVAL:  # no longer a symlink: it changed since it was listed
                    raise FileNotFoundError(errno.ENOENT, "changed while listed", name) from None
                raise
        elif kind in (Kind.CHAR_DEVICE, Kind.BLOCK_DEVICE):
            entry.rdev = st.st_rdev
        entry.xattrs = xattrs(leaf_path(dir_fd, name))
        return entry


def xattrs(path):
    """{name: value as hex} of a file's extended attributes (links not followed; see
    leaf_path)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):  # none on this file system, or on links
            return {}
        raise
    found = {}
    for name in sorted(names):
        if not name.startswith(XATTR_SKIPPED):
            try:
                found[name] = os.getxattr(path, name, follow_symlinks=False).hex()
            except OSError as e:
                if e.errno != errno.ENODATA:  # removed meanwhile
                    raise
    return found


# --- hashing ----------------------------------------------------------------------------


def all_zeros(data):
    """Whether a block is zeros only (compared whole: slicing ZEROS would copy it)."""
    return data == ZEROS if len(data) == BLOCK else data.count(0) == len(data)


# A file this large is read and hashed by threads, each its own part (reading and sha256
# let go of the interpreter's lock): a big file the app changed is read whole to find the
# blocks that differ, after the stop too. 512 MiB took 0.44 s in one thread, 0.21 in two.
THREADED_FROM = 16 << 20
HASHING_THREADS = 4


def block_hashes(f, size, on_block=None):
    """(block hashes, file digest) of an open file, read to its end; `size`: as the caller
    last saw it, None if it did not (it only says whether threads read the file);
    on_block(index, data, hash) sees each block, one at a time, not necessarily in order."""
    hashes = []
    threads = min(HASHING_THREADS, os.cpu_count() or 1)
    if size is None:
        size = os.fstat(f.fileno()).st_size
    if size >= THREADED_FROM and threads > 1:
        hashes = threaded_hashes(f.fileno(), -(-size // BLOCK), threads, on_block)
        while hashes and not hashes[-1]:  # it shrank while read (the app runs)
            hashes.pop()
        f.seek(len(hashes) * BLOCK)  # and it may have grown
    while data := f.read(BLOCK):
        h = hashlib.sha256(data).digest()[:HASH_BYTES]
        if on_block:
            on_block(len(hashes), data, h)
        hashes.append(h)
    return hashes, file_digest(hashes)


def threaded_hashes(fd, blocks, threads, on_block) -> list[bytes]:
    """The hashes of blocks [0, blocks) of the file `fd`, each thread reading a part; a
    block past the end (it shrank meanwhile) has an empty hash, which no digest of what
    the file holds can match."""
    hashes = [b""] * blocks
    one_at_a_time = threading.Lock()

    def part(first, end):
        for index in range(first, end):
            data = os.pread(fd, BLOCK, index * BLOCK)
            if not data:
                return
            hashes[index] = h = hashlib.sha256(data).digest()[:HASH_BYTES]
            if on_block:
                with one_at_a_time:
                    on_block(index, data, h)

    bounds = [blocks * k // threads for k in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(part, a, b) for a, b in itertools.pairwise(bounds)]:
            done.result()
    return hashes


def file_digest(hashes):
    return hashlib.sha256(b"".join(hashes)).hexdigest()


def hashed(entry: Entry, dir_fd, name) -> Entry | None:
    """`entry` with its file's block hashes, digest, and change time once read (a later
    time than the listing's means it changed while it was read). None if it is gone or no
    longer a file (changed while the app runs: the final pass will see)."""
    try:
        with open_regular(name, dir_fd) as f:
            hashes, entry.digest = block_hashes(f, entry.size)
            entry.ctime_ns = os.fstat(f.fileno()).st_ctime_ns
    except OSError as e:
        if not_there(e):
            return None
        raise
    entry.blocks = b"".join(hashes)
    return entry


# --- the listing ------------------------------------------------------------------------


def widen_pipe(stream):
    """A 1 MiB pipe instead of 64 KiB: the reader wakes up less often per byte sent."""
    try:
        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except OSError:  # not a pipe, or the system's limit is lower: the default works too
        pass


def described_entries(base):
    """(Entry, lstat, descriptor of its directory, name) of everything under `base`, as
    tree_entries() finds it; an entry removed before it could be described is left out (the
    app runs: what lists the stopped source, or sweeps it, will not find it either)."""
    for rel, st, dir_fd, name in tree_entries(base):
        try:
            entry = Entry.of(rel, st, dir_fd, name)
        except OSError as e:
            if not_there(e):
                continue
            raise
        yield entry, st, dir_fd, name


def scan(base, write, hashes=False):
    """The sending side of a listing: every entry under `base`, a line each, through
    `write`; with `hashes`, files with their block hashes."""
    for entry, _, dir_fd, name in described_entries(base):
        if hashes and entry.kind == Kind.FILE:
            entry = hashed(entry, dir_fd, name)
        if entry is not None:
            write(entry.to_wire() + "\n")


def agent_lines(proc, what) -> Iterator[bytes]:
    """The lines an agent (`proc`, a process) sends; raises SyncError if it failed."""
    for raw in proc.stdout:
        if raw.startswith(b'{"ok"'):  # the agent's error answer
            raise SyncError(f"{what}: {json.loads(raw).get('message')}")
        yield raw
    err = proc.stderr.read().decode("utf-8", "replace").strip()
    if proc.wait() != 0:
        raise SyncError(f"{what} failed (status {proc.returncode})" + (f": {err[-400:]}" if err else ""))


def entries(proc, what) -> Iterator[Entry]:
    """The receiving side of a listing: the entries a scanning agent sends. A survey's
    listing (see Survey) ends at its LISTED line, and its agent goes on to wait for the
    sweep."""
    for raw in agent_lines(proc, what):
        if raw.startswith(LISTED):
            return
        yield Entry.from_wire(raw)


def local_entries(base) -> Iterator[Entry]:
    """Every entry under `base`, described here."""
    for entry, *_ in described_entries(base):
        yield entry


def merged(source: Iterator[Entry], target_base) -> Iterator[tuple[Entry | None, Entry | None]]:
    """(source entry or None, target entry or None) pairs, walking the source's listing and
    the tree at `target_base` in step."""
    target = local_entries(target_base)
    src, dst = next(source, None), next(target, None)
    while src is not None or dst is not None:
        if dst is None or (src is not None and sort_key(src.path) < sort_key(dst.path)):
            yield src, None
            src = next(source, None)
        elif src is None or sort_key(dst.path) < sort_key(src.path):
            yield None, dst
            dst = next(target, None)
        else:
            yield src, dst
            src, dst = next(source, None), next(target, None)


# --- the survey: what changed since a listing, found with one lstat an entry ------------
#
# A survey lists the running source like scan(), ends the listing with a LISTED line, and
# keeps each directory's entries as fingerprints, 8 bytes each. Then it reads sweep
# requests, {"sweep": [entries to describe again], "last": bool}, one at a time, and
# answers each with what changed since it last looked: an Entry line for each entry that
# is new or changed (every entry of a directory it had not seen), and a Names line with a
# directory's names now for each one that may have lost a name (fewer of its entries
# match, and its own change time moved: see Seen); then a SWEPT line. Each
# sweep remembers what it found, so the next one answers what changed since it. The
# helper sweeps while the app runs until little changes between two sweeps, then once
# more after the app stopped ("last": in processes side by side, its lines in no
# particular order), and closes the request stream: the agent ends. So the final pass
# lists, sends and settles what changed, not everything the app has.

LISTED = b'{"survey":"listed"}'
SWEPT = b'{"survey":"swept"}'
# An entry changed this close to the moment it was looked at may change again without its
# change time changing (a coarse clock tick): the next sweep describes it again, whatever.
RACY_NS = 1_000_000_000


def fingerprint(name, st) -> int:
    """What changes whenever anything of an entry does: every write, chmod, chown, xattr or
    ACL change, link, unlink or rename sets its change time, which no program can set back.
    (Python's hash: the seed is this process's, so an app cannot aim for a collision.)"""
    return hash(
        (name, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_mode, st.st_size, st.st_nlink)
        + (st.st_uid, st.st_gid, st.st_rdev)
    )


@dataclass(frozen=True, slots=True)
class Names:
    """A directory's names, from a sweep: in the copy, any other name goes."""

    dir: str
    names: list[str]


def join(rel_dir, name):
    return f"{rel_dir}/{name}" if rel_dir else name


def walk_dirs(base, look: Callable[[str, int], list[str]]):
    """Call look(directory, its descriptor) for each real directory under `base` (and
    `base`), depth first; each look returns the names of the directory's subdirectories to
    enter. Its own descriptors, one a level (as tree_entries()), opened after any fork."""
    try:
        root = os.open(base, DIRECTORY)
    except FileNotFoundError:
        return
    stack = [("", root, None)]  # (directory, its descriptor, its subdirectories left)
    try:
        while stack:
            rel_dir, fd, subdirs = stack[-1]
            if subdirs is None:
                stack[-1] = (rel_dir, fd, iter(look(rel_dir, fd)))
                continue
            name = next(subdirs, None)
            if name is None:
                os.close(fd)
                stack.pop()
                continue
            if (inner := open_subdir(fd, name)) is not None:
                stack.append((join(rel_dir, name), inner, None))
    finally:
        for _, fd, _ in stack:
            os.close(fd)


# What a process of a split sweep writes before its error (a line never starts with it).
SWEEP_FAILED = "\0sweep failed: "


def flushing(stream) -> Callable[[str], object]:
    """A write to `stream` that sends at once: a sweep's finds go out a directory at a
    time, and the final pass fetches what they name meanwhile."""

    def write(text):
        stream.write(text)
        stream.flush()

    return write


def pass_lines_on(fd, write, said: list):
    """Pass on what a process of a split sweep writes, whole lines at a time as they come
    (the final pass fetches what they name meanwhile), but its error: into `said`."""
    with os.fdopen(fd, "rb") as f:
        rest = b""
        while chunk := f.read1(1 << 16):
            lines, _, rest = (rest + chunk).rpartition(b"\n")
            if lines:
                write(lines.decode() + "\n")
        said.append(rest.decode(errors="replace"))


# Processes of the sweep after the stop (see Survey.split_sweep): it is what the stopped
# time grows with, per entry (200,000 entries on tmpfs: 0.59 s in one).
SWEEP_PROCESSES = min(2, os.cpu_count() or 1) if hasattr(os, "fork") else 1


@dataclass(frozen=True, slots=True)
class Seen:
    """What a survey found in one directory: its entries' fingerprints, how many names it
    had, and its own stamp (directory_stamp) as it was before it was listed. An entry
    changed within RACY_NS of the look has no fingerprint, so it never matches; the count
    still has it, so that its going is noticed."""

    fingerprints: array  # 8 bytes an entry: a survey keeps one for every entry the app has
    names: int
    stamp: int | None = None


NOTHING_SEEN = Seen(array("q"), 0)


def directory_stamp(st, cutoff) -> int | None:
    """What changes whenever a directory gains or loses a name: every link, unlink, rename,
    mkdir or rmdir in it sets its change time, which no program can set back; with its
    inode, so that another directory put in its place never matches. None if it changed
    within RACY_NS of the look (it may change again within the clock tick)."""
    return hash((st.st_dev, st.st_ino, st.st_ctime_ns)) if st.st_ctime_ns < cutoff else None


class Survey:
    """The listing half and the sweep half of a survey, in one agent (see above)."""

    def __init__(self, base):
        self.base = base
        self.seen: dict[str, Seen] = {}  # directory: what the last look found in it

    def scan(self, write: Callable[[str], object]):
        """Every entry under the base, a line each, as scan() sends them; remembered."""
        found = {"": (array("q"), [0], None)}  # directory: (fingerprints, [names], stamp)
        cutoff = time.time_ns() - RACY_NS
        for entry, st, _, name in described_entries(self.base):
            if entry.kind == Kind.DIRECTORY:  # its lstat comes before its listing
                found[entry.path] = (array("q"), [0], directory_stamp(st, cutoff))
            marks, names, _ = found.setdefault(entry.path.rpartition("/")[0], (array("q"), [0], None))
            names[0] += 1
            if st.st_ctime_ns < cutoff:
                marks.append(fingerprint(name, st))
            write(entry.to_wire() + "\n")
        self.seen = {rel: Seen(marks, names[0], stamp) for rel, (marks, names, stamp) in found.items()}

    def sweep(self, again: set[str], write: Callable[[str], object], last=False):
        """What changed since the last look (see above); `again`: entries described again
        whatever their fingerprints say, with their directories' names (where a verify
        found the copy different). While the app runs, an entry may go at any moment: it
        is left out, as the listing does. Descriptors held: one a level, as tree_entries()
        does. `last`: the app has stopped and nothing more is asked (see split_sweep)."""
        cutoff = time.time_ns() - RACY_NS
        forced: dict[str, set[str]] = {}  # directory: its names in `again`
        for rel in again:
            rel_dir, _, name = rel.rpartition("/")
            forced.setdefault(rel_dir, set()).add(name)
        seen: dict[str, Seen] = {}
        if last and SWEEP_PROCESSES > 1:
            self.split_sweep(forced, cutoff, write)
            self.seen = seen  # what another sweep would compare with: nothing
            return

        def look(rel_dir, fd):
            return self.look(rel_dir, fd, forced, cutoff, seen, write)

        walk_dirs(self.base, look)
        self.seen = seen

    def split_sweep(self, forced, cutoff, write):
        """The sweep after the stop, in SWEEP_PROCESSES processes: each looks at its share
        of the directories (by a hash of their path, the same in each: a fork keeps the
        seed) and only lists the others, with no stat, to find its own. The stopped time
        is the sweep's. What each finds goes out a directory at a time, as it is found (the
        final pass fetches what changed meanwhile); in no particular order, which the
        helper does not need of a stopped source (see sync.FinalPass)."""
        children = []
        one_at_a_time = threading.Lock()

        def write_lines(text):
            with one_at_a_time:
                write(text)

        for share in range(1, SWEEP_PROCESSES):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: its share, into the pipe, and nothing else
                status = 1
                try:
                    os.close(read_end)
                    with os.fdopen(write_end, "w") as out:
                        try:
                            self.sweep_share(share, forced, cutoff, flushing(out))
                            status = 0
                        except BaseException as error:  # what failed, for the parent to say
                            out.write(f"{SWEEP_FAILED}{type(error).__name__}: {error}")
                finally:
                    os._exit(status)
            os.close(write_end)
            said = []
            reader = threading.Thread(
                target=pass_lines_on, args=(read_end, write_lines, said), name=f"sweep-{share}"
            )
            reader.start()  # a pipe holds 64 KiB: the child must never wait for the parent
            children.append((pid, reader, said))
        try:
            self.sweep_share(0, forced, cutoff, write_lines)
        finally:
            for pid, reader, said in children:
                reader.join()
                said.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        for _, _, (last_words, status) in children:
            if status != 0:
                why = last_words.rpartition(SWEEP_FAILED)[2] if SWEEP_FAILED in last_words else "no message"
                raise SyncError(f"a process of the sweep failed (status {status}): {why}")

    def sweep_share(self, share, forced, cutoff, write):
        def look(rel_dir, fd):
            if hash(rel_dir) % SWEEP_PROCESSES == share:
                return self.look(rel_dir, fd, forced, cutoff, {}, write)
            with os.scandir(fd) as listed:
                return [e.name for e in listed if e.is_dir(follow_symlinks=False)]

        walk_dirs(self.base, look)

    def look(self, rel_dir, fd, forced, cutoff, seen, write) -> list[str]:
        """Sweep one directory (see sweep()); returns its subdirectories' names, in order.
        What it finds goes to `write` at once, in one piece. The inner loop of a sweep:
        every entry the app has goes through it."""
        before = self.seen.get(rel_dir, NOTHING_SEEN)
        again = forced.get(rel_dir, ())
        # A set for the look up: memory for one directory at a time, as its listing takes.
        known = frozenset(before.fingerprints)
        names, marks, subdirs, kept, found = [], array("q"), [], 0, []
        stamp = directory_stamp(os.fstat(fd), cutoff)  # before the listing: see Seen
        for name in sorted(os.listdir(fd)):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                mark = fingerprint(name, st)
                if mark in known and name not in again:
                    kept += 1
                else:
                    found.append(Entry.of(join(rel_dir, name), st, fd, name).to_wire() + "\n")
            except OSError as e:
                if not_there(e):
                    continue
                raise
            names.append(name)
            if st.st_ctime_ns < cutoff:
                marks.append(mark)
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(name)
        seen[rel_dir] = Seen(marks, len(names), stamp)
        # A name may have gone: fewer match than it had, and it gained or lost one since
        # (an entry that only changed, say a file written to, takes none away).
        lost = kept < before.names and (stamp is None or stamp != before.stamp)
        if lost or again:
            found.append(json.dumps({"names": rel_dir, "n": names}) + "\n")
        if found:
            write("".join(found))
        return subdirs


def swept(proc, what) -> Iterator[Entry | Names]:
    """The receiving side of a sweep: what the survey agent `proc` says changed, up to its
    SWEPT line (SyncError if it ends before)."""
    for raw in agent_lines(proc, what):
        if raw.startswith(SWEPT):
            return
        if raw.startswith(b'{"names"'):
            data = json.loads(raw)
            yield Names(data["names"], data["n"])
        else:
            yield Entry.from_wire(raw)
    raise SyncError(f"{what}: the survey ended before its sweep did")


# --- deltas -----------------------------------------------------------------------------
#
# A request is a JSON line {"p": path, "b": hex of the copy's block hashes}. The answer, for
# each request:
#     F <path as JSON>\n
#     B <index> <length>\n<data>     for each block whose hash differs
#     Z <index> <length>\n           for such a block that is all zeros (a hole, maybe)
#     E <the file's Entry, with its digest>\n
# or `X <path as JSON>\n` if it is gone or no longer a regular file.


def delta_request(path: str, known: bytes) -> bytes:
    """The asking side: a request for the blocks of `path` that differ from `known`."""
    return json.dumps({"p": path, "b": known.hex()}).encode() + b"\n"


def send_deltas(base, requests: Iterable[bytes], out, check_path):
    """The sending side: answer each request (a line) with the blocks of the file under
    `base` that differ from what the copy has, on the binary stream `out`."""
    for line in requests:
        request = json.loads(line)
        rel = check_path(request["p"])
        theirs = bytes.fromhex(request.get("b", ""))

        def send(index, data, h, theirs=theirs):
            if theirs[index * HASH_BYTES : (index + 1) * HASH_BYTES] != h:
                if all_zeros(data):
                    out.write(b"Z %d %d\n" % (index, len(data)))
                else:
                    out.write(b"B %d %d\n" % (index, len(data)) + data)  # one write, not two

        try:
            with parent_dir(base, rel) as (dir_fd, name), open_regular(name, dir_fd) as f:
                end = Entry.of(rel, os.fstat(f.fileno()), dir_fd, name)
                data_fd = os.dup(f.fileno())
        except OSError as e:
            if not not_there(e):
                raise
            out.write(b"X " + json.dumps(rel).encode() + b"\n")  # gone, or no longer a file
            continue
        out.write(b"F " + json.dumps(rel).encode() + b"\n")
        with os.fdopen(data_fd, "rb") as f:
            _, end.digest = block_hashes(f, end.size, send)
        out.write(b"E " + end.to_wire().encode() + b"\n")
    out.flush()


@dataclass(frozen=True, slots=True)
class FileStart:
    path: str


@dataclass(frozen=True, slots=True)
class Block:
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Zeros:
    index: int
    length: int


@dataclass(frozen=True, slots=True)
class FileEnd:
    entry: Entry  # as the source has it, with its digest


@dataclass(frozen=True, slots=True)
class Gone:
    path: str


def read_deltas(stream) -> Iterator[FileStart | Block | Zeros | FileEnd | Gone]:
    """The receiving side: what a delta sender answers, as it arrives."""
    while header := stream.readline():
        kind, _, rest = header.rstrip(b"\n").partition(b" ")
        if kind == b"F":
            yield FileStart(json.loads(rest))
        elif kind in (b"B", b"Z"):
            number, length = (int(x) for x in rest.split())
            if kind == b"Z":
                yield Zeros(number, length)
                continue
            data = stream.read(length)
            if len(data) != length:
                raise SyncError("the source's answer broke off in the middle of a block")
            yield Block(number, data)
        elif kind == b"E":
            yield FileEnd(Entry.from_wire(rest))
        elif kind == b"X":
            yield Gone(json.loads(rest))
        else:
            detail = (header + stream.read(2000)).decode("utf-8", "replace")
            raise SyncError(f"unexpected answer from the source: {detail[:300]}")
