"""
The final pass and the verification, on block hashes kept from the pre-copy.

rsync moves the bulk while the app runs. Then, still before the stop, `build_index` hashes
the source in 64 KiB blocks (by its agent), and the copies of the files that changed since
the copy began (here, at the same time), and keeps, per file, the source's metadata, the
copy's block hashes, and whether the two matched. After the stop, `FinalPass` lists the
source and sends for only the files that changed since (or might have: modified too close
to the hashing) the blocks that differ: the source is read once, the copy not at all. It
settles everything else an entry has: kind, mode, owner, times, symlink targets, special
files (fifos, sockets, devices), extended attributes and POSIX ACLs, sparseness, and which
names are one file (hard links). `verify` then compares every entry of the copy with the
stopped source's listing, each of those properties and the content: a file's content
counts as verified when its digests matched, at the index for files unchanged since (for a
file untouched since the copy began, by rsync's check as it sent it), or at the final pass.

Between the hashing and verify the copy is the helper's alone: a copy file whose size and
time are unchanged since it was hashed is taken to hold what was hashed.

The source app shaped both trees, and any name in them may be a symlink to anywhere (one
that rsync copied may stand where the source now has a directory). So nothing in the copy
is reached by a path the kernel resolves: see `Copy`.

Everything per file lives in SQLite in the helper's work directory, and the listings are
streamed, so memory stays flat however many files an app has. Each thread writes through a
connection of its own; the listing commits in batches, so no writer waits long.
"""

import ctypes
import hashlib
import json
import os
import queue
import shutil
import sqlite3
import stat
import threading
import time

from ..grids.hostgrid_agent import (
    BLOCK,
    HASH_BYTES,
    ZEROS,
    all_zeros,
    block_hashes,
    describe_entry,
    file_digest,
    leaf_path,
    not_there,
    open_regular,
    parent_dir,
    sort_key,
    tree_entries,
    xattrs,
)
from .progress import human_bytes

AS_ROOT = os.geteuid() == 0
# What an entry has beyond its content, which the final pass settles (owners only as root:
# otherwise everything the helper writes is its own).
METADATA = ("m", "t", "x", "u", "g") if AS_ROOT else ("m", "t", "x")
# What verify compares, entry by entry.
COMPARED = ("k", "m", "s", "t", "l", "r", "x", "u", "g") if AS_ROOT else ("k", "m", "s", "t", "l", "r", "x")
NAMES = {
    "k": "type",
    "m": "mode",
    "s": "size",
    "t": "mtime",
    "l": "link",
    "u": "owner",
    "g": "group",
    "r": "device",
    "x": "xattrs",
}
SPECIAL = {"p": stat.S_IFIFO, "s": stat.S_IFSOCK, "c": stat.S_IFCHR, "b": stat.S_IFBLK}
ZERO_HASH = hashlib.sha256(ZEROS).digest()[:HASH_BYTES]
# Listing rows per transaction: a fetcher writing its results never waits long.
BATCH = 2000
# Problems verify lists in full; the rest are counted.
PROBLEMS_SHOWN = 100


class SyncError(Exception):
    pass


def agent_lines(proc, what):
    """JSON entries from a streaming agent operation; raises if it failed."""
    for raw in proc.stdout:
        entry = json.loads(raw)
        if "ok" in entry:  # the agent's error answer
            raise SyncError(f"{what}: {entry.get('message')}")
        yield entry
    err = proc.stderr.read().decode("utf-8", "replace").strip()
    if proc.wait() != 0:
        raise SyncError(f"{what} failed (status {proc.returncode}): {err[-400:]}")


def merged(source_entries, target_base):
    """(source entry or None, target entry or None) pairs, walking both trees in step."""
    target = ((rel, describe_entry(rel, st, fd, name)) for rel, st, fd, name in tree_entries(target_base))
    src, dst = next(source_entries, None), next(target, None)
    while src is not None or dst is not None:
        if dst is None or (src is not None and sort_key(src["p"]) < sort_key(dst[0])):
            yield src, None
            src = next(source_entries, None)
        elif src is None or sort_key(dst[0]) < sort_key(src["p"]):
            yield None, dst[1]
            dst = next(target, None)
        else:
            yield src, dst[1]
            src, dst = next(source_entries, None), next(target, None)


class Index:
    def __init__(self, path, busy_timeout=60.0):
        if os.path.exists(path):
            os.unlink(path)
        self.path = path
        self.busy_timeout = busy_timeout
        self.db = self.connect()
        self.db.executescript(
            """
            CREATE TABLE src (path TEXT PRIMARY KEY, size INT, mtime INT, digest TEXT);
            CREATE TABLE dst (path TEXT PRIMARY KEY, size INT, mtime INT, digest TEXT, blocks BLOB);
            -- The stopped source, in listing order (rowid), for verify; ino: "dev:inode" of
            -- files with more than one name.
            CREATE TABLE final (path TEXT, kind TEXT, ino TEXT, entry TEXT);
            -- The hard-link fix-up and verify look up the names of one source file.
            CREATE INDEX final_ino ON final (ino) WHERE ino IS NOT NULL;
            -- Paths only the copy has, removed once the listing is done.
            CREATE TABLE doomed (path TEXT);
            -- Files the final pass settled: sent, or only their metadata set; ok = digests matched.
            CREATE TABLE sent (path TEXT PRIMARY KEY, ok INT);
            -- Verify's record of linked files on either side.
            CREATE TABLE links (path TEXT, src_ino TEXT, dst_ino TEXT);
            """
        )

    def connect(self):
        """A connection for one thread; it waits for another's write, never fails on it."""
        db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=self.busy_timeout
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        return db


def build_index(source, source_app, target_base, index, copy_began_ns=None, on_progress=None):
    """Hash the source (its agent does, streaming) and take the copy's block hashes,
    calling on_progress(bytes hashed) as the source's listing goes (what it raises ends
    the hashing).

    A copy file is read only if its source may have changed since the copy began
    (`copy_began_ns`, in the source's clock). One whose change time, which no program can
    set back, was older still once it was hashed, and whose copy has its size and time, is
    what rsync sent; rsync checks each file it sends against a whole-file checksum, so the
    source's hashes are the copy's. The others are hashed here, in a thread, while the
    source's hashes stream in. Returns (files, copies read, files differing).
    """
    proc = source.open_scan(source_app, hashes=True)
    copy = Copy(target_base)
    db = index.db
    lock = threading.Lock()  # one connection, one transaction, two threads
    to_read = queue.Queue(maxsize=256)
    failure = []

    def read_copies():
        while (rel := to_read.get()) is not None:
            if failure:
                continue  # keep taking requests, so the listing never waits on a full queue
            try:
                with copy.open(rel) as f:
                    st = os.fstat(f.fileno())
                    hashes, digest = block_hashes(f)
                with lock:
                    db.execute(
                        "INSERT INTO dst VALUES (?, ?, ?, ?, ?)",
                        (rel, st.st_size, st.st_mtime_ns, digest, b"".join(hashes)),
                    )
            except Exception as error:
                if not not_there(error):  # never a silent death: the hashing fails with it
                    failure.append(error)

    def untouched_since_copied(entry):
        if copy_began_ns is None or entry["c"] >= copy_began_ns:
            return False
        try:
            st = copy.lstat(entry["p"])
        except OSError as e:
            if not_there(e):
                return False
            raise
        return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (entry["s"], entry["t"])

    reader = threading.Thread(target=read_copies, name="index-reader")
    reader.start()
    read = hashed = 0
    try:
        with lock:
            db.execute("BEGIN")
        for e in agent_lines(proc, "hashing the source"):
            if e["k"] != "f":
                continue
            hashed += e["s"]
            if on_progress is not None:
                on_progress(hashed)
            trusted = untouched_since_copied(e)
            with lock:
                db.execute("INSERT INTO src VALUES (?, ?, ?, ?)", (e["p"], e["s"], e["t"], e["d"]))
                if trusted:
                    db.execute(
                        "INSERT INTO dst VALUES (?, ?, ?, ?, ?)",
                        (e["p"], e["s"], e["t"], e["d"], bytes.fromhex(e["b"])),
                    )
            if not trusted:
                to_read.put(e["p"])
                read += 1
    except BaseException:
        proc.kill()  # a listing cut short (a cancel, an error) is not needed any more
        proc.wait()
        to_read.put(None)
        reader.join()
        db.execute("ROLLBACK")
        raise
    to_read.put(None)
    reader.join()
    if failure:
        db.execute("ROLLBACK")
        raise SyncError(f"reading the copy: {failure[0]}")
    db.execute("COMMIT")
    files = db.execute("SELECT count(*) FROM src").fetchone()[0]
    same = db.execute(
        "SELECT count(*) FROM src JOIN dst USING (path) WHERE src.digest = dst.digest AND src.size = dst.size"
    ).fetchone()[0]
    return files, read, files - same


class FinalPass:
    """Bring the copy in line with the stopped source; see the module's docstring."""

    def __init__(
        self, source, source_app, target_base, index, clean_before_ns, on_progress, bwlimit_kbps=None
    ):
        self.source, self.source_app = source, source_app
        self.bwlimit = bwlimit_kbps * 1024 if bwlimit_kbps else None
        self.copy = Copy(target_base)
        self.base = target_base
        self.index = index
        self.clean_before_ns = clean_before_ns
        self.on_progress = on_progress
        # (path, the copy's block hashes) to ask the source for, as the listing finds them
        self.requests = queue.SimpleQueue()
        self.fetched = 0
        self.bytes_received = 0
        self.counting = threading.Lock()
        self.scan = self.deltas = None

    def open(self):
        """Start the source's agents, before the app stops: starting one costs an SSH
        session and an interpreter, which the stopped time need not include. The listing
        waits for run()."""
        self.scan = self.source.open_scan(self.source_app, wait=True)
        self.deltas = [self.source.open_delta(self.source_app) for _ in range(2)]

    def close(self):
        """Stop whatever of the source's agents still runs (after a failure)."""
        for proc in [self.scan, *(self.deltas or [])]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    def run(self):
        """Returns (files fetched, bytes of changed blocks received)."""
        # Files that were changing while the app ran will have changed again: fetch them
        # while the source is being listed. Files the listing finds changed are fetched
        # as it finds them. The source is read by three agents at once, the copy's tree
        # is walked meanwhile, and the stopped time is the longest of these, not their sum.
        failures = []

        def fetching(proc, requests, gone_ok, name):
            def fetch():
                try:
                    self.fetch(proc, requests, gone_ok)
                except Exception as error:  # never a silent death: the pass fails with it
                    failures.append(error)

            thread = threading.Thread(target=fetch, name=name)
            thread.start()
            return thread

        if self.scan is None:
            self.open()
        self.scan.stdin.write(b"go\n")
        self.scan.stdin.close()
        hot_delta, delta = self.deltas
        fetchers = [
            fetching(hot_delta, self.hot(), True, "fetch-hot"),
            fetching(delta, iter(self.requests.get, None), False, "fetch-changed"),
        ]
        try:
            self.reconcile_all()
        finally:
            self.requests.put(None)  # the end of the requests
            for thread in fetchers:
                thread.join()
        if failures:
            error = failures[0]
            if isinstance(error, OSError | SyncError | sqlite3.Error):
                raise error
            raise SyncError(f"fetching changed files: {type(error).__name__}: {error}") from error
        self.link_names()
        self.settle_dirs()
        return self.fetched, self.bytes_received

    def hot(self):
        """(path, the copy's block hashes) of the files that were changing while hashed."""
        db = self.index.connect()
        try:
            yield from db.execute(
                "SELECT path, dst.blocks FROM src JOIN dst USING (path) WHERE src.digest != dst.digest "
                "OR src.mtime >= ? ORDER BY dst.rowid",
                (self.clean_before_ns,),
            )
        finally:
            db.close()

    def reconcile_all(self):
        """List the stopped source, and make the copy's tree like it, file contents aside."""
        db = self.index.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for count, (src, dst) in enumerate(
                merged(agent_lines(self.scan, "listing the source"), self.base), 1
            ):
                if src is None:
                    db.execute("INSERT INTO doomed VALUES (?)", (dst["p"],))
                else:
                    db.execute(
                        "INSERT INTO final VALUES (?, ?, ?, ?)",
                        (src["p"], src["k"], src.get("i"), json.dumps(src)),
                    )
                    self.reconcile(src, dst)
                if count % BATCH == 0:
                    db.execute("COMMIT")
                    db.execute("BEGIN IMMEDIATE")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        for (rel,) in db.execute("SELECT path FROM doomed ORDER BY rowid DESC"):  # deepest first
            self.copy.remove(rel)

    def reconcile(self, src, dst):
        rel, kind = src["p"], src["k"]
        if dst is not None and (dst["k"] != kind or dst.get("r") != src.get("r")):
            self.copy.remove(rel)
            dst = None
        if kind == "d":
            if dst is None:
                self.copy.make(src)  # its mode, owner and time once its contents are in
        elif kind == "f":
            self.reconcile_file(src, dst)
        else:
            if kind == "l" and dst is not None and dst["l"] != src["l"]:
                self.copy.remove(rel)
                dst = None
            if dst is None:
                self.copy.make(src)
            if dst is None or any(src.get(f) != dst.get(f) for f in METADATA):
                self.copy.settle(src)

    def reconcile_file(self, src, dst):
        db = self.index.db
        if (
            src.get("i")
            and db.execute(
                "SELECT 1 FROM final WHERE ino = ? AND path != ? LIMIT 1", (src["i"], src["p"])
            ).fetchone()
        ):
            return  # another name of this source file came first: link_names makes it that one
        row = db.execute(
            "SELECT src.size, src.mtime, src.digest, dst.size, dst.mtime, dst.digest, dst.blocks "
            "FROM src LEFT JOIN dst USING (path) WHERE path = ?",
            (src["p"],),
        ).fetchone()
        hashed_both = row is not None and row[5] is not None
        if hashed_both and (row[2] != row[5] or row[1] >= self.clean_before_ns):
            return  # changing while hashed: the hot fetch has it
        # One file in the copy, but not on the source: a file of its own, content kept.
        unlinked = dst is not None and dst.get("n") and not src.get("i")
        if unlinked:
            self.copy.unlink_from_others(src["p"])
        if self.same_content(src, dst, row):
            if unlinked or any(src.get(f) != dst.get(f) for f in METADATA):
                self.copy.settle(src)
                db.execute("INSERT OR REPLACE INTO sent VALUES (?, 1)", (src["p"],))
            return
        known = b""
        if dst is not None and dst["k"] == "f" and hashed_both and (row[3], row[4]) == (dst["s"], dst["t"]):
            known = row[6]
        self.requests.put((src["p"], known))

    def same_content(self, src, dst, row):
        """Both sides hashed equal, and neither changed since: the copy's content is right.

        Its time may still be off: rsync sets the time it listed, and the app may have
        written between that listing and the read.
        """
        if dst is None or dst["k"] != "f" or src["t"] >= self.clean_before_ns or row is None:
            return False
        return (row[0], row[1], row[2], row[3], row[4]) == (src["s"], src["t"], row[5], dst["s"], dst["t"])

    def fetch(self, proc, requests, gone_ok):
        """Ask the source's agent (`proc`, see open()) for the blocks that differ, and write
        them into the copy.

        `requests` (an iterable, possibly still growing) are (path, the copy's block hashes).
        A file the source no longer has is an error, unless `gone_ok` (the listing then
        decides what becomes of it).
        """
        db = self.index.connect()  # this runs in a thread of its own
        blocks = {}
        asking = []

        def ask():
            try:
                for rel, known in requests:
                    blocks[rel] = known
                    proc.stdin.write(json.dumps({"p": rel, "b": known.hex()}).encode() + b"\n")
                    proc.stdin.flush()
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the agent failed; its answer says why
            except Exception as error:  # never a silent death: the fetch fails with it
                asking.append(error)
                proc.kill()

        writer = threading.Thread(target=ask, name="fetch-requests", daemon=True)
        writer.start()
        out = proc.stdout
        current = None
        started = time.monotonic()
        try:
            while header := out.readline():
                kind, _, rest = header.rstrip(b"\n").partition(b" ")
                if kind == b"F":
                    rel = json.loads(rest)
                    current = self.receive(rel, blocks.pop(rel), gone_ok)
                elif kind in (b"B", b"Z"):
                    number, length = (int(x) for x in rest.split())
                    if kind == b"Z":
                        current.zero(number, length)
                        continue
                    data = out.read(length)
                    if len(data) != length:
                        raise SyncError(f"the source's answer broke off in {current.rel}")
                    current.write(number, data)
                    with self.counting:
                        self.bytes_received += length
                    self.on_progress(self.bytes_received)
                    self.throttle(started)
                elif kind == b"E":
                    ok = current.finish(json.loads(rest), gone_ok)
                    if ok is not None:
                        db.execute("INSERT OR REPLACE INTO sent VALUES (?, ?)", (current.rel, int(ok)))
                        with self.counting:
                            self.fetched += 1
                    current = None
                elif kind == b"X" and gone_ok:
                    blocks.pop(json.loads(rest), None)
                elif kind == b"X":
                    raise SyncError(f"{json.loads(rest)} vanished from the stopped source")
                else:
                    detail = (header + out.read(2000)).decode("utf-8", "replace")
                    raise SyncError(f"unexpected answer from the source: {detail[:300]}")
        finally:
            if current is not None:
                current.abandon()
            db.close()
        writer.join()
        if asking:
            raise asking[0]
        err = proc.stderr.read().decode("utf-8", "replace").strip()
        if proc.wait() != 0 or current is not None:
            raise SyncError(f"sending changed blocks failed (status {proc.returncode}): {err[-400:]}")

    def receive(self, rel, known, gone_ok):
        """A Receiving for `rel`; with `gone_ok`, one that drops what it is sent if the
        copy no longer has the file's directory (the listing has made it something else,
        as the source has it now)."""
        try:
            return Receiving(self.copy, rel, known)
        except OSError as error:
            if gone_ok and not_there(error):
                return Dropping(rel)
            raise

    def throttle(self, started):
        """Read no faster than the bandwidth limit: the pipe slows the sender down in turn."""
        if self.bwlimit:
            ahead = self.bytes_received / self.bwlimit - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    def link_names(self):
        """Names that are one file on the source are one file in the copy: each is made a
        link to the group's first name, whose content and metadata the pass settled."""
        current = anchor = None
        for ino, rel in self.index.db.execute(
            "SELECT ino, path FROM final WHERE ino IS NOT NULL ORDER BY ino, rowid"
        ):
            if ino != current:
                current, anchor = ino, rel
                continue
            self.copy.link(anchor, rel)

    def settle_dirs(self):
        """Directories' mode, owner, xattrs and time, now that their contents are in:
        deepest first, so that nothing changes a directory after it was settled."""
        db = self.index.db
        for (entry,) in db.execute("SELECT entry FROM final WHERE kind = 'd' ORDER BY rowid DESC"):
            self.copy.settle(json.loads(entry))


class Receiving:
    """One file of the copy being brought up to date, block by block."""

    def __init__(self, copy, rel, known):
        self.rel = rel
        self.copy = copy
        self.hashes = [known[i : i + HASH_BYTES] for i in range(0, len(known), HASH_BYTES)]
        # Its directory stays open until the file is in: it is reached once, with no symlink
        # followed, and the new file is renamed within it.
        self.parent = parent_dir(copy.base, rel)
        self.dir_fd, self.name = self.parent.open()
        try:
            # Known blocks: patch the copy in place, unless another name shares its inode (a
            # hard link): then patch a copy of it and rename that over this name only.
            # Unknown blocks: write a new file and rename it over the old one.
            self.fresh = not known
            self.partial = self.name
            if self.fresh or os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False).st_nlink > 1:
                self.partial = f"{self.name}.mig-partial"
                if known:
                    sparse_copy(self.dir_fd, self.name, self.partial)
            flags = os.O_RDWR if known else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            self.file = open_regular(self.partial, self.dir_fd, flags)
        except BaseException:
            self.parent.close()
            raise

    def note(self, number, digest):
        while len(self.hashes) <= number:
            self.hashes.append(b"")
        self.hashes[number] = digest

    def write(self, number, data):
        self.file.seek(number * BLOCK)
        self.file.write(data)
        self.note(number, hashlib.sha256(data).digest()[:HASH_BYTES])

    def zero(self, number, length):
        """A block of zeros: a hole in a new file; in an old one, its data made a hole."""
        if not self.fresh:
            punch_hole(self.file, number * BLOCK, length)
        digest = ZERO_HASH if length == BLOCK else hashlib.sha256(bytes(length)).digest()[:HASH_BYTES]
        self.note(number, digest)

    def finish(self, end, gone_ok=False):
        """Size and metadata as the source has them; True if the digests match. With
        `gone_ok`, None if the file's directory was removed meanwhile (see receive())."""
        try:
            self.file.truncate(end["s"])
            self.file.close()
            if self.partial != self.name:
                try:
                    os.replace(self.partial, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
                except FileNotFoundError:
                    if gone_ok:
                        return None
                    raise
            set_metadata(self.dir_fd, self.name, end)
        finally:
            self.parent.close()
        blocks = -(-end["s"] // BLOCK)
        return file_digest(self.hashes[:blocks]) == end["d"]

    def abandon(self):
        self.file.close()
        if self.partial != self.name:
            try:
                os.unlink(self.partial, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
        self.parent.close()


class Dropping:
    """A file sent for a path the copy no longer has room for: its blocks go nowhere."""

    def __init__(self, rel):
        self.rel = rel

    def write(self, number, data):
        pass

    def zero(self, number, length):
        pass

    def finish(self, end, gone_ok=True):
        return None

    def abandon(self):
        pass


libc = ctypes.CDLL(None, use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def punch_hole(file, offset, length):
    """Make a range of a file a hole (it reads as zeros and takes no space); where the file
    system cannot, write the zeros."""
    file.flush()
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    fallocate = getattr(libc, "fallocate", None)
    if fallocate is None or fallocate(file.fileno(), mode, ctypes.c_int64(offset), ctypes.c_int64(length)):
        file.seek(offset)
        file.write(bytes(length))


def sparse_copy(dir_fd, source, destination):
    """Copy a file's bytes to another name in its directory, leaving zero blocks as holes."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    with open_regular(source, dir_fd) as src, open_regular(destination, dir_fd, flags) as dst:
        while data := src.read(BLOCK):
            if all_zeros(data):
                dst.seek(len(data), os.SEEK_CUR)
            else:
                dst.write(data)
        dst.truncate()


def set_xattrs(path, wanted):
    current = xattrs(path)
    for name in current.keys() - wanted.keys():
        os.removexattr(path, name, follow_symlinks=False)
    for name, value in wanted.items():
        if current.get(name) != value:
            os.setxattr(path, name, bytes.fromhex(value), follow_symlinks=False)


def set_metadata(dir_fd, name, entry):
    """Owner, xattrs, mode and time of an entry as the source has them, in that order: a
    change of owner clears set-id bits, and a mode set after the ACLs keeps their mask."""
    if AS_ROOT:
        os.chown(name, entry["u"], entry["g"], dir_fd=dir_fd, follow_symlinks=False)
    set_xattrs(leaf_path(dir_fd, name), entry.get("x", {}))
    if entry["k"] != "l":  # a symlink's own mode is fixed
        chmod_no_follow(dir_fd, name, entry["m"])
    os.utime(name, ns=(entry["t"], entry["t"]), dir_fd=dir_fd, follow_symlinks=False)


def chmod_no_follow(dir_fd, name, mode):
    try:
        os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)
    except NotImplementedError:  # a C library without fchmodat(AT_SYMLINK_NOFOLLOW)
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise SyncError(f"{name}: a symlink where a file was expected") from None
        os.chmod(name, mode, dir_fd=dir_fd)


class Copy:
    """The copy's tree (the target app's volumes), every name reached from a directory
    descriptor with no symlink followed (see the agent's parent_dir)."""

    def __init__(self, base):
        self.base = base

    def parent(self, rel):
        return parent_dir(self.base, rel)

    def lstat(self, rel):
        with self.parent(rel) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def open(self, rel):
        """A regular file, for reading (FileNotFoundError if it is something else)."""
        with self.parent(rel) as (fd, name):
            return open_regular(name, fd)

    def remove(self, rel):
        """Whatever `rel` is, gone (a directory with everything in it); nothing if it is
        already gone."""
        try:
            with self.parent(rel) as (fd, name):
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
        except OSError as e:
            if not not_there(e):
                raise

    def make(self, entry):
        """A directory (private until settled), symlink or special file as `entry` describes."""
        with self.parent(entry["p"]) as (fd, name):
            if entry["k"] == "d":
                os.mkdir(name, 0o700, dir_fd=fd)
            elif entry["k"] == "l":
                os.symlink(entry["l"], name, dir_fd=fd)
            else:
                os.mknod(name, 0o600 | SPECIAL[entry["k"]], entry.get("r", 0), dir_fd=fd)

    def settle(self, entry):
        with self.parent(entry["p"]) as (fd, name):
            set_metadata(fd, name, entry)

    def unlink_from_others(self, rel):
        """Make a name that shares its file with others a file of its own, with its content
        (its metadata is the caller's to set)."""
        with self.parent(rel) as (fd, name):
            temporary = f"{name}.mig-unlink"
            sparse_copy(fd, name, temporary)
            os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)

    def link(self, anchor, rel):
        """Make `rel` another name of the file `anchor`, unless it is already."""
        with self.parent(anchor) as (anchor_fd, anchor_name), self.parent(rel) as (fd, name):
            try:
                if os.path.samestat(
                    os.stat(name, dir_fd=fd, follow_symlinks=False),
                    os.stat(anchor_name, dir_fd=anchor_fd, follow_symlinks=False),
                ):
                    return
            except FileNotFoundError:
                pass
            temporary = f"{name}.mig-link"
            os.link(anchor_name, temporary, src_dir_fd=anchor_fd, dst_dir_fd=fd, follow_symlinks=False)
            os.replace(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)


def verify(target_base, index):
    """Every entry of the copy against the stopped source. Returns (entries, problems)."""
    db = index.db
    db.execute("DELETE FROM links")
    listing = index.connect()
    source = (json.loads(entry) for (entry,) in listing.execute("SELECT entry FROM final ORDER BY rowid"))
    problems, count = [], 0
    db.execute("BEGIN")
    try:
        for src, dst in merged(source, target_base):
            count += 1
            if problem := entry_problem(db, src, dst):
                problems.append(problem)
            if src is not None and dst is not None and (src.get("i") or dst.get("i")):
                db.execute("INSERT INTO links VALUES (?, ?, ?)", (src["p"], src.get("i"), dst.get("i")))
    finally:
        db.execute("COMMIT")
        listing.close()
    problems += link_problems(db)
    if len(problems) > PROBLEMS_SHOWN:
        problems[PROBLEMS_SHOWN:] = [f"and {len(problems) - PROBLEMS_SHOWN} more"]
    return count, problems


def entry_problem(db, src, dst):
    rel = (src or dst)["p"]
    if dst is None:
        return f"{rel}: missing from the copy"
    if src is None:
        return f"{rel}: only in the copy"
    differ = [f for f in COMPARED if src.get(f) != dst.get(f)]
    if differ:
        return f"{rel}: " + ", ".join(difference(f, src, dst) for f in differ) + " (source ≠ copy)"
    if src["k"] != "f":
        return None
    if not content_verified(db, src):
        return f"{rel}: content differs"
    # A sparse file stays sparse: the copy may take a little more room, not the holes.
    if src["a"] < src["s"] and dst["a"] > src["a"] + max(BLOCK, src["s"] // 64):
        return (
            f"{rel}: sparse on the source ({human_bytes(src['a'])} of {human_bytes(src['s'])} "
            f"allocated), not in the copy ({human_bytes(dst['a'])} allocated)"
        )
    return None


def difference(field, src, dst):
    if field == "x":
        theirs, ours = src.get("x", {}), dst.get("x", {})
        names = sorted(n for n in theirs.keys() | ours.keys() if theirs.get(n) != ours.get(n))
        return f"xattrs differ ({', '.join(names)})"
    return f"{NAMES[field]} {src.get(field)} ≠ {dst.get(field)}"


def content_verified(db, src):
    """Whether a file's content is known to match: its digests matched when the final pass
    sent it, or at the index with both sides unchanged since. Another name of one source
    file has the content of its first name (verify checks that they are one file)."""
    path = src["p"]
    if src.get("i"):
        path = db.execute(
            "SELECT path FROM final WHERE ino = ? ORDER BY rowid LIMIT 1", (src["i"],)
        ).fetchone()[0]
    if (row := db.execute("SELECT ok FROM sent WHERE path = ?", (path,)).fetchone()) is not None:
        return bool(row[0])
    row = db.execute(
        "SELECT src.digest = dst.digest FROM src JOIN dst USING (path) "
        "WHERE path = ? AND src.size = ? AND src.mtime = ? AND dst.size = ? AND dst.mtime = ?",
        (path, src["s"], src["t"], src["s"], src["t"]),
    ).fetchone()
    return bool(row and row[0])


def link_problems(db):
    """Names that are one file on one side must be one file on the other."""
    problems = []
    for (names,) in db.execute(
        "SELECT group_concat(path, ', ') FROM links WHERE src_ino IS NOT NULL GROUP BY src_ino "
        "HAVING count(DISTINCT coalesce(dst_ino, 'alone:' || path)) > 1"
    ):
        problems.append(f"{names}: one file on the source, not one in the copy")
    for (names,) in db.execute(
        "SELECT group_concat(path, ', ') FROM links WHERE dst_ino IS NOT NULL GROUP BY dst_ino "
        "HAVING count(DISTINCT coalesce(src_ino, 'alone:' || path)) > 1"
    ):
        problems.append(f"{names}: separate files on the source, one file in the copy")
    return problems
