"""
The final pass and the verification, on block hashes kept from the pre-copy.

rsync moves the bulk while the app runs. Then, still before the stop, `build_index` hashes
the source in 64 KiB blocks (by its agent), and the copies of the files that changed since
the copy began (here, at the same time), and keeps, per file, the source's metadata, the
copy's block hashes, and whether the two matched. After the stop, `final_pass` lists the
source (metadata only) and sends for only the files that changed since (or might have:
modified too close to the hashing) the blocks that differ: the source is read once, the
copy not at all. `verify` then compares every entry of the copy with the stopped source's
listing: a file's content counts as verified when its digests matched, at the index for
files unchanged since (for a file untouched since the copy began, by rsync's check as it
sent it), or at the final pass.

Between the hashing and verify the copy is the helper's alone: a copy file whose size and
time are unchanged since it was hashed is taken to hold what was hashed.

Everything per file lives in SQLite in the helper's work directory, and the listings are
streamed, so memory stays flat however many files an app has.
"""

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
    block_hashes,
    describe_entry,
    file_digest,
    sort_key,
    tree_entries,
)

AS_ROOT = os.geteuid() == 0
METADATA = ("m", "t", "u", "g") if AS_ROOT else ("m", "t")
NAMES = {"k": "type", "m": "mode", "s": "size", "t": "mtime", "l": "link", "u": "owner", "g": "group"}


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
    target = ((rel, describe_entry(target_base, rel, st)) for rel, st in tree_entries(target_base))
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
    def __init__(self, path):
        if os.path.exists(path):
            os.unlink(path)
        self.path = path
        self.db = self.connect()
        self.db.executescript(
            """
            CREATE TABLE src (path TEXT PRIMARY KEY, size INT, mtime INT, digest TEXT);
            CREATE TABLE dst (path TEXT PRIMARY KEY, size INT, mtime INT, digest TEXT, blocks BLOB);
            -- The stopped source, in listing order (rowid), for verify.
            CREATE TABLE final (path TEXT, entry TEXT);
            -- Files the final pass settled: sent, or only their times set; ok = digests matched.
            CREATE TABLE sent (path TEXT PRIMARY KEY, ok INT);
            """
        )

    def connect(self):
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        return db


def build_index(source, source_app, target_base, index, copy_began_ns=None):
    """Hash the source (its agent does, streaming) and take the copy's block hashes.

    A copy file is read only if its source may have changed since the copy began
    (`copy_began_ns`, in the source's clock). One whose change time, which no program can
    set back, was older still once it was hashed, and whose copy has its size and time, is
    what rsync sent; rsync checks each file it sends against a whole-file checksum, so the
    source's hashes are the copy's. The others are hashed here, in a thread, while the
    source's hashes stream in. Returns (files, copies read, files differing).
    """
    proc = source.open_scan(source_app, hashes=True)
    db = index.db
    lock = threading.Lock()  # one connection, one transaction, two threads
    to_read = queue.Queue(maxsize=256)
    failure = []

    def read_copies():
        while (rel := to_read.get()) is not None:
            if failure:
                continue  # keep taking requests, so the listing never waits on a full queue
            path = os.path.join(target_base, rel)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue
                hashes, digest = block_hashes(path)
            except FileNotFoundError:
                continue
            except OSError as error:
                failure.append(error)
                continue
            with lock:
                db.execute(
                    "INSERT INTO dst VALUES (?, ?, ?, ?, ?)",
                    (rel, st.st_size, st.st_mtime_ns, digest, b"".join(hashes)),
                )

    def untouched_since_copied(entry):
        if copy_began_ns is None or entry["c"] >= copy_began_ns:
            return False
        try:
            st = os.lstat(os.path.join(target_base, entry["p"]))
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (entry["s"], entry["t"])

    reader = threading.Thread(target=read_copies)
    reader.start()
    read = 0
    try:
        with lock:
            db.execute("BEGIN")
        for e in agent_lines(proc, "hashing the source"):
            if e["k"] != "f":
                continue
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
    finally:
        to_read.put(None)
        reader.join()
    if failure:
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
        self.base = target_base
        self.index = index
        self.clean_before_ns = clean_before_ns
        self.on_progress = on_progress
        # (path, the copy's block hashes) to ask the source for, as the listing finds them
        self.requests = queue.SimpleQueue()
        self.requested = 0
        self.doomed = []  # paths only the copy has
        self.dirs = []
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
        hot = self.index.db.execute(
            "SELECT path, dst.blocks FROM src JOIN dst USING (path) WHERE src.digest != dst.digest "
            "OR src.mtime >= ? ORDER BY dst.rowid",
            (self.clean_before_ns,),
        ).fetchall()
        self.prefetched = {path for path, _ in hot}
        failures = []

        def fetching(proc, requests, gone_ok):
            def fetch():
                try:
                    self.fetch(proc, requests, gone_ok)
                except (SyncError, OSError, ValueError) as error:
                    failures.append(error)

            thread = threading.Thread(target=fetch)
            thread.start()
            return thread

        if self.scan is None:
            self.open()
        self.scan.stdin.write(b"go\n")
        self.scan.stdin.close()
        hot_delta, delta = self.deltas
        fetchers = [fetching(hot_delta, hot, True), fetching(delta, iter(self.requests.get, None), False)]
        try:
            self.reconcile_all()
        finally:
            self.requests.put(None)  # the end of the requests
            for thread in fetchers:
                thread.join()
        if failures:
            raise failures[0]
        for entry in reversed(self.dirs):  # after their contents changed
            path = os.path.join(self.base, entry["p"])
            os.chmod(path, entry["m"])
            if AS_ROOT:
                os.lchown(path, entry["u"], entry["g"])
        return len(hot) + self.requested, self.bytes_received

    def reconcile_all(self):
        """List the stopped source, and make the copy's tree like it, file contents aside."""
        db = self.index.db
        db.execute("BEGIN")
        for src, dst in merged(agent_lines(self.scan, "listing the source"), self.base):
            if src is None:
                self.doomed.append(dst["p"])
                continue
            db.execute("INSERT INTO final VALUES (?, ?)", (src["p"], json.dumps(src)))
            self.reconcile(src, dst)
        db.execute("COMMIT")
        for rel in reversed(self.doomed):  # deepest first
            remove(os.path.join(self.base, rel))

    def same_content(self, src, dst):
        """Both sides hashed equal, and neither changed since: the copy's content is right.

        Its time may still be off: rsync sets the time it listed, and the app may have
        written between that listing and the read.
        """
        if dst is None or dst["k"] != "f" or src["t"] >= self.clean_before_ns:
            return False
        row = self.index.db.execute(
            "SELECT src.size, src.mtime, src.digest = dst.digest, dst.size, dst.mtime "
            "FROM src JOIN dst USING (path) WHERE path = ?",
            (src["p"],),
        ).fetchone()
        return row is not None and row == (src["s"], src["t"], 1, dst["s"], dst["t"])

    def reconcile(self, src, dst):
        path = os.path.join(self.base, src["p"])
        if dst is not None and dst["k"] != src["k"]:
            remove(path)
            dst = None
        if src["k"] == "d":
            if dst is None:
                os.mkdir(path, 0o700)
            self.dirs.append(src)
        elif src["k"] == "l":
            if dst is None or dst.get("l") != src["l"]:
                if dst is not None:
                    os.unlink(path)
                os.symlink(src["l"], path)
            if AS_ROOT:
                os.lchown(path, src["u"], src["g"])
        elif src["k"] == "f" and src["p"] in self.prefetched:
            pass
        elif src["k"] == "f" and self.same_content(src, dst):
            if any(src[f] != dst[f] for f in METADATA):
                set_metadata(path, src)
                self.index.db.execute("INSERT OR REPLACE INTO sent VALUES (?, 1)", (src["p"],))
        elif src["k"] == "f":
            known = b""
            if dst is not None:
                row = self.index.db.execute(
                    "SELECT blocks FROM dst WHERE path = ? AND mtime = ? AND size = ?",
                    (src["p"], dst["t"], dst["s"]),
                ).fetchone()
                known = row[0] if row else b""
            self.requests.put((src["p"], known))
            self.requested += 1

    def fetch(self, proc, requests, gone_ok):
        """Ask the source's agent (`proc`, see open()) for the blocks that differ, and write
        them into the copy.

        `requests` (an iterable, possibly still growing) are (path, the copy's block hashes).
        A file the source no longer has is an error, unless `gone_ok` (the listing then
        decides what becomes of it).
        """
        db = self.index.connect()  # this may run in a thread of its own
        blocks = {}

        def ask():
            try:
                for rel, known in requests:
                    blocks[rel] = known
                    proc.stdin.write(json.dumps({"p": rel, "b": known.hex()}).encode() + b"\n")
                    proc.stdin.flush()
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the agent failed; its answer says why

        writer = threading.Thread(target=ask, daemon=True)
        writer.start()
        out = proc.stdout
        current = None
        started = time.monotonic()
        while header := out.readline():
            kind, _, rest = header.rstrip(b"\n").partition(b" ")
            if kind == b"F":
                rel = json.loads(rest)
                current = Receiving(self.base, rel, blocks[rel])
            elif kind == b"B":
                number, length = (int(x) for x in rest.split())
                data = out.read(length)
                if len(data) != length:
                    raise SyncError(f"the source's answer broke off in {current.rel}")
                current.write(number, data)
                with self.counting:
                    self.bytes_received += length
                self.on_progress(self.bytes_received)
                self.throttle(started)
            elif kind == b"E":
                ok = current.finish(json.loads(rest))
                db.execute("INSERT OR REPLACE INTO sent VALUES (?, ?)", (current.rel, int(ok)))
                current = None
            elif kind == b"X" and gone_ok:
                continue
            elif kind == b"X":
                raise SyncError(f"{json.loads(rest)} vanished from the stopped source")
            else:
                detail = (header + out.read(2000)).decode("utf-8", "replace")
                raise SyncError(f"unexpected answer from the source: {detail[:300]}")
        writer.join()
        db.close()
        err = proc.stderr.read().decode("utf-8", "replace").strip()
        if proc.wait() != 0 or current is not None:
            raise SyncError(f"sending changed blocks failed (status {proc.returncode}): {err[-400:]}")

    def throttle(self, started):
        """Read no faster than the bandwidth limit: the pipe slows the sender down in turn."""
        if self.bwlimit:
            ahead = self.bytes_received / self.bwlimit - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


class Receiving:
    """One file of the copy being brought up to date, block by block."""

    def __init__(self, base, rel, known):
        self.rel = rel
        self.path = os.path.join(base, rel)
        self.hashes = [known[i : i + HASH_BYTES] for i in range(0, len(known), HASH_BYTES)]
        # Known blocks: patch the copy in place, unless another name shares its inode (a
        # hard link): then patch a copy of it and rename that over this name only.
        # Unknown blocks: write a new file and rename it over the old one.
        self.partial = self.path
        if not known or os.lstat(self.path).st_nlink > 1:
            self.partial = f"{self.path}.mig-partial"
            if known:
                shutil.copyfile(self.path, self.partial)
        self.file = open(self.partial, "r+b" if known else "wb")

    def write(self, number, data):
        self.file.seek(number * BLOCK)
        self.file.write(data)
        while len(self.hashes) <= number:
            self.hashes.append(b"")
        self.hashes[number] = hashlib.sha256(data).digest()[:HASH_BYTES]

    def finish(self, end):
        """Size, mode, owner and time as the source has them; True if the digests match."""
        self.file.truncate(end["s"])
        self.file.close()
        blocks = -(-end["s"] // BLOCK)
        if self.partial != self.path:
            os.replace(self.partial, self.path)
        set_metadata(self.path, end)
        return file_digest(self.hashes[:blocks]) == end["d"]


def set_metadata(path, entry):
    """Mode, owner (when root) and time of a file as the source has them."""
    os.chmod(path, entry["m"])
    if AS_ROOT:
        os.lchown(path, entry["u"], entry["g"])
    os.utime(path, ns=(entry["t"], entry["t"]))


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def verify(target_base, index):
    """Every entry of the copy against the stopped source. Returns (entries, problems)."""
    db = index.db
    rows = db.execute("SELECT entry FROM final ORDER BY rowid")
    source = (json.loads(r[0]) for r in rows)
    problems, count = [], 0
    sent = dict(db.execute("SELECT path, ok FROM sent").fetchall())
    for src, dst in merged(source, target_base):
        count += 1
        rel = (src or dst)["p"]
        if dst is None:
            if src["k"] != "o":
                problems.append(f"{rel}: missing from the copy")
            continue
        if src is None:
            problems.append(f"{rel}: only in the copy")
            continue
        fields = ["k", "m", "s", "t", "l"] + (["u", "g"] if AS_ROOT else [])
        differ = [f for f in fields if src.get(f) != dst.get(f)]
        if src["k"] == "d":
            differ = [f for f in differ if f != "t"]
        if differ:
            detail = ", ".join(f"{NAMES[f]} {src.get(f)} ≠ {dst.get(f)}" for f in differ)
            problems.append(f"{rel}: {detail} (source ≠ copy)")
        elif src["k"] == "f" and not content_verified(db, sent, src):
            problems.append(f"{rel}: content differs")
    return count, problems


def content_verified(db, sent, src):
    if src["p"] in sent:
        return bool(sent[src["p"]])
    row = db.execute(
        "SELECT src.digest = dst.digest FROM src JOIN dst USING (path) "
        "WHERE path = ? AND src.size = ? AND src.mtime = ? AND dst.size = ? AND dst.mtime = ?",
        (src["p"], src["s"], src["t"], src["s"], src["t"]),
    ).fetchone()
    return bool(row and row[0])
