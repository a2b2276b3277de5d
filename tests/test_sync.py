"""The helper's final pass and verify, step by step, on a real source app and a real copy."""

import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from migrations_app.grids import gridinfo, open_grid
from migrations_app.grids.agent import tree
from migrations_app.grids.agent.tree import BLOCK, Entry, Kind
from migrations_app.helper import sync

from .sshd import GRID_PYTHON


@pytest.fixture
def pair(tmp_path):
    """A stopped source app on a local grid with some data, and an rsync'd copy of it."""
    config = gridinfo.parse(
        f'[grids.east]\ndriver = "hostgrid"\ntransport = "local"\nroot = "{tmp_path / "east"}"\n'
        f'python = "{GRID_PYTHON}"\n'
    )["east"]
    source = open_grid(config, "")
    source.init()
    source.define("app", {"volumes": ["data"], "components": []})
    data = tmp_path / "east/apps/app/volumes/data"
    (data / "dir").mkdir()
    (data / "big.bin").write_bytes(os.urandom(8 * BLOCK + 100))
    (data / "dir/small.txt").write_text("small\n")
    (data / "gone.txt").write_text("to be deleted\n")
    os.symlink("dir/small.txt", data / "link")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "east/apps/app/volumes", copy, symlinks=True, copy_function=shutil.copy2)
    return source, data, copy, tmp_path


def described(base, rel):
    """An entry of a tree as both sides of a copy describe it."""
    with tree.parent_dir(str(base), rel) as (fd, name):
        return Entry.of(rel, os.stat(name, dir_fd=fd, follow_symlinks=False), fd, name)


def index_now(pair):
    source, data, copy, tmp_path = pair
    index = sync.Index(str(tmp_path / "index.sqlite3"))
    files, _, differing = sync.build_index(source, "app", str(copy), index)
    # Everything written so far is older than "now" minus the margin the helper uses.
    time.sleep(0.05)
    return index, files, differing


def final(pair, index, clean_before_ns=None):
    source, data, copy, tmp_path = pair
    clean_before = clean_before_ns or time.time_ns()
    received = []
    run = sync.FinalPass(sync.Standby(source, "app"), str(copy), index, clean_before, received.append)
    files, sent = run.run()
    return files, sent, sync.verify(str(copy), index)


def test_unchanged_source_sends_nothing(pair):
    index, files, differing = index_now(pair)
    assert (files, differing) == (3, 0)
    files, sent, (entries, problems) = final(pair, index)
    assert (files, sent, problems) == (0, 0, [])
    assert entries == 6  # big.bin, dir, dir/small.txt, gone.txt, link, and the volume itself


def test_the_forecast_counts_what_the_final_pass_will_fetch(pair):
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    clean_before = time.time_ns()
    quiet = sync.forecast(source, "app", str(copy), index, clean_before)
    assert (quiet.entries, quiet.files, quiet.bytes) == (6, 0, 0)
    assert quiet.listing_seconds > 0
    (data / "dir/small.txt").write_text("small, and changed since it was hashed\n")
    (data / "new.txt").write_text("new\n")
    busy = sync.forecast(source, "app", str(copy), index, clean_before)
    # Both are fetched by the final pass: one changed since the hashing, one never hashed.
    assert (busy.entries, busy.files) == (7, 2)
    assert busy.bytes == len("small, and changed since it was hashed\n") + len("new\n")
    files, _, (_, problems) = final(pair, index, clean_before)
    assert (files, problems) == (2, [])


def test_only_changed_blocks_are_sent_and_the_tree_follows(pair):
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    with open(data / "big.bin", "r+b") as f:
        f.seek(3 * BLOCK + 10)
        f.write(b"changed")
    (data / "gone.txt").unlink()
    (data / "new").mkdir()
    (data / "new/file.txt").write_text("new\n")
    (data / "dir/small.txt").chmod(0o600)
    (data / "link").unlink()
    os.symlink("big.bin", data / "link")
    files, sent, (entries, problems) = final(pair, index)
    assert problems == []
    assert sent == BLOCK + len("new\n")  # one block of big.bin, and the new file
    assert (copy / "data/big.bin").read_bytes() == (data / "big.bin").read_bytes()
    assert not (copy / "data/gone.txt").exists()
    assert (copy / "data/new/file.txt").read_text() == "new\n"
    assert os.readlink(copy / "data/link") == "big.bin"
    assert (copy / "data/dir/small.txt").stat().st_mode & 0o777 == 0o600


def test_a_file_read_by_threads_sends_just_its_changed_blocks_and_holes(pair):
    source, data, copy, _ = pair
    blocks = tree.THREADED_FROM // BLOCK + 5
    with open(data / "huge.bin", "wb") as f:
        f.write(os.urandom(blocks * BLOCK + 123))
    shutil.copy2(data / "huge.bin", copy / "data/huge.bin")
    index, _, _ = index_now(pair)
    with open(data / "huge.bin", "r+b") as f:
        for number in (0, blocks // 2, blocks):  # the first, one in the middle, the short last
            f.seek(number * BLOCK)
            f.write(b"changed")
        f.seek(7 * BLOCK)
        f.write(bytes(BLOCK))  # now a block of zeros: sent as such, not as data
    files, sent, (entries, problems) = final(pair, index)
    assert problems == []
    assert (files, sent) == (1, 2 * BLOCK + 123)
    assert (copy / "data/huge.bin").read_bytes() == (data / "huge.bin").read_bytes()


def test_agents_started_ahead_read_the_source_as_it_is_at_their_go(pair):
    # The helper starts them as the pre-copy begins; what changes after that, before the
    # hashing or after it, is what they find.
    source, data, copy, tmp_path = pair
    standby = sync.Standby(source, "app")
    standby.start(*sync.Reader)
    standby.start(sync.Reader.DELTA)
    (data / "dir/small.txt").write_text("changed before the hashing\n")
    index = sync.Index(str(tmp_path / "index.sqlite3"))
    files, _, differing = sync.build_index(
        source, "app", str(copy), index, scan=standby.take(sync.Reader.HASHING)
    )
    assert (files, differing) == (3, 1)
    time.sleep(0.05)  # older than "now" minus the margin, as in index_now
    (data / "new.txt").write_text("new after the hashing\n")
    files, _ = sync.FinalPass(standby, str(copy), index, time.time_ns(), lambda n: None).run()
    assert files == 2
    entries, problems = sync.verify(str(copy), index)
    assert problems == [] and entries == 7
    assert (copy / "data/new.txt").read_text() == "new after the hashing\n"
    assert standby.ready == {reader: [] for reader in sync.Reader}


def test_an_agent_that_ended_while_waiting_is_replaced_when_taken(pair):
    # As one whose connection dropped during a long pre-copy would: the final pass must
    # not find out after the stop.
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    standby = sync.Standby(source, "app")
    standby.start(sync.Reader.LISTING, sync.Reader.DELTA, sync.Reader.DELTA)
    dead = standby.ready[sync.Reader.LISTING][0]
    dead.kill()
    dead.wait()
    (data / "dir/small.txt").write_text("changed\n")
    final_pass = sync.FinalPass(standby, str(copy), index, time.time_ns(), lambda n: None)
    final_pass.open()
    assert final_pass.scan is not dead and final_pass.scan.poll() is None
    assert final_pass.run()[0] == 1
    assert sync.verify(str(copy), index)[1] == []


def test_agents_no_step_took_are_stopped(pair):
    source, *_ = pair
    standby = sync.Standby(source, "app")
    standby.start(*sync.Reader)
    started = [proc for procs in standby.ready.values() for proc in procs]
    assert all(proc.poll() is None for proc in started)
    standby.close()
    assert all(proc.poll() is not None for proc in started)
    assert standby.ready == {}


def test_a_file_written_within_the_clock_tick_is_read_again(pair):
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    # Same size and time as when hashed, different content: only "too recent" catches it.
    st = os.stat(data / "dir/small.txt")
    (data / "dir/small.txt").write_text("SMALL\n")
    os.utime(data / "dir/small.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    files, sent, (entries, problems) = final(pair, index, clean_before_ns=st.st_mtime_ns)
    assert problems == [] and sent == len("SMALL\n")
    assert (copy / "data/dir/small.txt").read_text() == "SMALL\n"


def test_a_file_written_after_the_hashing_with_its_time_set_back_is_read_again(pair):
    # Same size, and the time it had when hashed, long before: only its change time tells.
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    clean_before = time.time_ns()
    st = os.stat(data / "dir/small.txt")
    (data / "dir/small.txt").write_text("SMALL\n")
    os.utime(data / "dir/small.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    files, sent, (entries, problems) = final(pair, index, clean_before_ns=clean_before)
    assert problems == [] and sent == len("SMALL\n")
    assert (copy / "data/dir/small.txt").read_text() == "SMALL\n"


def test_right_content_with_the_wrong_time_gets_the_time(pair):
    # rsync sets the time it listed; the app may have written before rsync read the file.
    source, data, copy, _ = pair
    os.utime(copy / "data/dir/small.txt", ns=(1, 1_000_000_000))
    index, _, differing = index_now(pair)
    assert differing == 0
    files, sent, (entries, problems) = final(pair, index)
    assert (sent, problems) == (0, [])
    assert os.stat(copy / "data/dir/small.txt").st_mtime_ns == os.stat(data / "dir/small.txt").st_mtime_ns


def test_a_hard_link_in_the_copy_is_not_written_through(pair):
    source, data, copy, _ = pair
    os.link(copy / "data/dir/small.txt", copy / "data/other-name")
    (data / "other-name").write_text("small\n")
    shutil.copystat(copy / "data/dir/small.txt", data / "other-name")
    index, _, _ = index_now(pair)
    (data / "dir/small.txt").write_text("changed\n")
    files, sent, (entries, problems) = final(pair, index)
    assert problems == []
    assert (copy / "data/other-name").read_text() == "small\n"
    assert (copy / "data/dir/small.txt").read_text() == "changed\n"


def test_verify_finds_a_copy_that_differs(pair):
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    final(pair, index)
    with open(copy / "data/big.bin", "r+b") as f:
        f.write(b"corrupt")
    Path(copy / "data/extra").write_text("x")
    (copy / "data/dir/small.txt").unlink()
    entries, problems = sync.verify(str(copy), index)
    assert "data/extra: only in the copy" in problems
    assert "data/dir/small.txt: missing from the copy" in problems
    assert any(p.startswith("data/big.bin: mtime") for p in problems), problems


def test_a_missing_source_app_fails_cleanly(pair, tmp_path):
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    source.destroy("app")
    with pytest.raises(sync.SyncError, match="does not exist"):
        final(pair, index)


def test_copies_untouched_since_the_copy_began_are_not_read(pair):
    source, data, copy, tmp_path = pair
    # Bytes changed behind rsync's back, size and time kept: only reading the copy sees it.
    # A copy of a file untouched since the copy began is what rsync sent and checked, so
    # the index takes the source's hashes for it and does not read it.
    with open(copy / "data/big.bin", "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))  # a byte that differs, whatever the random data was
    shutil.copystat(data / "big.bin", copy / "data/big.bin")
    began = time.time_ns()
    trusting = sync.build_index(source, "app", str(copy), sync.Index(str(tmp_path / "a.sqlite3")), began)
    assert trusting == (3, 0, 0)
    reading = sync.build_index(source, "app", str(copy), sync.Index(str(tmp_path / "b.sqlite3")))
    assert reading == (3, 3, 1)


def test_copies_of_files_changed_since_the_copy_began_are_read(pair):
    source, data, copy, tmp_path = pair
    began = time.time_ns()
    time.sleep(0.05)
    (data / "dir/small.txt").write_text("SMALL\n")  # after the copy began, before the hashing
    files, read, differing = sync.build_index(
        source, "app", str(copy), sync.Index(str(tmp_path / "i.sqlite3")), began
    )
    assert (files, read, differing) == (3, 1, 1)


def test_the_source_hashed_beside_the_copy_lends_its_hashes_to_the_copy_made_after(pair):
    # The helper hashes the source while rsync still copies: the copy's side is taken once
    # the copy is done, from the source's hashes wherever the source was untouched since
    # the copy began, and by reading the copy wherever it was not.
    source, data, copy, tmp_path = pair
    shutil.rmtree(copy)
    began = time.time_ns()
    index = sync.Index(str(tmp_path / "i.sqlite3"))
    hashing = sync.SourceHashing(source, "app", index, source.open_scan("app", hashes=True, wait=True))
    assert hashing.wait(60) == 3
    (data / "dir/small.txt").write_text("SMALL\n")  # after it was hashed, before it was copied
    shutil.copytree(tmp_path / "east/apps/app/volumes", copy, symlinks=True, copy_function=shutil.copy2)
    assert sync.take_copies(str(copy), index, began) == (1, 1)
    with open(copy / "data/big.bin", "rb") as f:
        blocks, _ = tree.block_hashes(f, None)
    kept = index.db.execute("SELECT blocks FROM dst WHERE path = 'data/big.bin'").fetchone()[0]
    assert kept == b"".join(blocks)


def test_a_hashing_beside_the_copy_that_fails_says_why(pair):
    source, data, copy, tmp_path = pair
    index = sync.Index(str(tmp_path / "i.sqlite3"))
    agent = source.open_scan("app", hashes=True, wait=True)
    source.destroy("app")
    hashing = sync.SourceHashing(source, "app", index, agent)
    with pytest.raises(sync.SyncError, match="does not exist"):
        hashing.wait(60)
    assert index.db.execute("SELECT count(*) FROM src").fetchone()[0] == 0


def test_a_file_written_while_hashed_says_so(tmp_path):
    # Its change time once read is what the index trusts (see build_index): a write during
    # the read must show in it.
    path = tmp_path / "busy.bin"
    path.write_bytes(os.urandom(64 << 20))  # tens of ms to hash: change times tick meanwhile
    writing = True

    def write():
        with open(path, "r+b") as f:
            while writing:
                f.seek(0)
                f.write(os.urandom(BLOCK))
                f.flush()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.02)
        before = os.lstat(path).st_ctime_ns  # what a listing just before would have said
        with tree.parent_dir(str(tmp_path), "busy.bin") as (fd, name):
            entry = tree.hashed(Entry("busy.bin", Kind.FILE, 0o644, 0, 0, 0), fd, name)
    finally:
        writing = False
        writer.join()
    assert entry.ctime_ns > before


# --- fidelity: everything an entry has arrives, and verify checks each of it --------------

AS_ROOT = os.geteuid() == 0
SPARSE_SIZE = 64 << 20


def make_special_entries(data):
    """What a careful copy must keep, beyond file contents; returns the paths made."""
    with open(data / "sparse.bin", "wb") as f:  # 64 MiB with 4 KiB of data: holes around it
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_SIZE // 2)
        f.write(os.urandom(4096))
    (data / "tagged.txt").write_text("with xattrs\n")
    os.setxattr(data / "tagged.txt", "user.mig.colour", b"blue")
    os.setxattr(data / "dir", "user.mig.kind", b"folder")
    (data / "acl.txt").write_text("with an ACL\n")
    subprocess.run(["setfacl", "-m", "u:nobody:rw", str(data / "acl.txt")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:nobody:rx", str(data / "dir")], check=True)
    (data / "one.txt").write_text("one file, two names\n")
    os.link(data / "one.txt", data / "dir/two.txt")
    os.mkfifo(data / "fifo")
    # Bound through a descriptor of `data`: a socket's path may be 108 bytes at most, and a
    # test's temporary directory may be longer (a chdir would move every thread of the worker).
    data_fd = os.open(data, os.O_DIRECTORY)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(tree.leaf_path(data_fd, "socket"))
    finally:
        os.close(data_fd)
    (data / "empty").mkdir()
    (data / "setuid").write_text("#!/bin/sh\n")
    if AS_ROOT:  # before the mode: a change of owner clears set-id bits
        os.lchown(data / "setuid", 1234, 5678)
        os.mknod(data / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(data / "setuid", 0o4755)
    os.symlink("one.txt", data / "to-one")
    os.utime(data / "to-one", ns=(1, 1_234_567_891), follow_symlinks=False)
    os.utime(data / "empty", ns=(1, 2_345_678_912))


def test_the_final_pass_keeps_everything_an_entry_has(pair):
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    make_special_entries(data)
    files, sent, (entries, problems) = final(pair, index)
    assert problems == []
    got = copy / "data"
    assert os.stat(got / "sparse.bin").st_blocks * 512 <= 64 * 1024, "the holes were filled in"
    assert (got / "sparse.bin").read_bytes() == (data / "sparse.bin").read_bytes()
    assert sent < 1 << 20, "zero blocks travel as holes, not as data"
    assert os.getxattr(got / "tagged.txt", "user.mig.colour") == b"blue"
    assert os.getxattr(got / "dir", "user.mig.kind") == b"folder"
    for path, name in (("acl.txt", "system.posix_acl_access"), ("dir", "system.posix_acl_default")):
        assert os.getxattr(got / path, name) == os.getxattr(data / path, name)
    assert os.path.samefile(got / "one.txt", got / "dir/two.txt")
    assert stat.S_ISFIFO(os.lstat(got / "fifo").st_mode)
    assert stat.S_ISSOCK(os.lstat(got / "socket").st_mode)
    assert (got / "empty").is_dir() and not any((got / "empty").iterdir())
    assert os.lstat(got / "empty").st_mtime_ns == 2_345_678_912
    assert stat.S_IMODE(os.lstat(got / "setuid").st_mode) == 0o4755
    assert os.readlink(got / "to-one") == "one.txt"
    assert os.lstat(got / "to-one").st_mtime_ns == 1_234_567_891
    if AS_ROOT:
        assert (os.lstat(got / "setuid").st_uid, os.lstat(got / "setuid").st_gid) == (1234, 5678)
        assert os.lstat(got / "null").st_rdev == os.makedev(1, 3)


def break_hard_link(path):
    shutil.copy2(path, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def densify(path):
    data = Path(path).read_bytes()
    st = os.stat(path)
    Path(path).unlink()
    Path(path).write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def join_names(first, second):
    st = os.lstat(second)
    os.unlink(second)
    os.link(first, second)
    os.utime(second, ns=(st.st_atime_ns, st.st_mtime_ns))


DAMAGES = {
    "an xattr lost": (
        lambda c: os.removexattr(c / "tagged.txt", "user.mig.colour"),
        "tagged.txt: xattrs differ",
    ),
    "an ACL lost": (lambda c: subprocess.run(["setfacl", "-b", str(c / "acl.txt")], check=True), "acl.txt:"),
    "holes filled": (lambda c: densify(c / "sparse.bin"), "data/sparse.bin: sparse on the source"),
    "a link broken": (
        lambda c: break_hard_link(c / "dir/two.txt"),
        "one file on the source, not one in the copy",
    ),
    "files joined": (lambda c: join_names(c / "tagged.txt", c / "acl.txt"), "one file in the copy"),
    "a fifo replaced": (
        lambda c: (os.unlink(c / "fifo"), (c / "fifo").write_text("")),
        "data/fifo: type p ≠ f",
    ),
    "a symlink's time": (
        lambda c: os.utime(c / "to-one", ns=(1, 5), follow_symlinks=False),
        "data/to-one: mtime",
    ),
    "a directory's time": (lambda c: os.utime(c / "empty", ns=(1, 5)), "data/empty: mtime"),
    "an empty directory lost": (lambda c: os.rmdir(c / "empty"), "data/empty: missing from the copy"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_verify_notices_each_property(pair, damage):
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    make_special_entries(data)
    final(pair, index)
    harm, expected = DAMAGES[damage]
    harm(copy / "data")
    entries, problems = sync.verify(str(copy), index)
    assert any(expected in p for p in problems), problems


def test_verify_judges_content_by_what_the_pass_and_the_index_recorded(pair):
    # Verify trusts a copy only the helper writes, and the final pass leaves no content
    # differing, so a copy whose content differs cannot be made for real here: the records
    # verify judges by are altered instead, one of each kind.
    source, data, copy, _ = pair
    index, _, _ = index_now(pair)
    make_special_entries(data)  # hard links among them
    final(pair, index)
    db = index.db
    assert sync.verify(str(copy), index)[1] == []
    # Unchanged since the hashing, so judged at the index: the digests recorded differ.
    assert db.execute("SELECT 1 FROM sent WHERE path = 'data/big.bin'").fetchone() is None
    db.execute("UPDATE dst SET digest = 'damaged' WHERE path = 'data/big.bin'")
    # Fetched by the final pass, whose digests then did not match.
    (sent_path,) = db.execute("SELECT path FROM sent WHERE path LIKE '%tagged.txt'").fetchone()
    db.execute("UPDATE sent SET ok = 0 WHERE path = ?", (sent_path,))
    # Two names of one file: the second's content is the first's.
    first, second = [p for (p,) in db.execute("SELECT path FROM final WHERE ino IS NOT NULL ORDER BY key")]
    db.execute("INSERT OR REPLACE INTO sent VALUES (?, 0)", (first,))
    problems = sync.verify(str(copy), index)[1]
    assert sorted(problems) == sorted(
        f"{path}: content differs" for path in ("data/big.bin", sent_path, first, second)
    )


def test_a_thread_that_fails_fails_the_pass_with_its_message(pair):
    # Only the fetchers write the results of what they fetched: with that table gone, a
    # fetcher meets a real SQLite error. The pass must fail with it, not return as if every
    # file had arrived.
    source, data, copy, tmp_path = pair
    index, _, _ = index_now(pair)
    (data / "dir/small.txt").write_text("changed: the final pass fetches it\n")
    index.db.execute("DROP TABLE sent")
    run = sync.FinalPass(sync.Standby(source, "app"), str(copy), index, time.time_ns(), lambda n: None)
    with pytest.raises(sqlite3.OperationalError, match="no such table: sent"):
        run.run()


# --- the live pass, and the sweep after the stop -------------------------------------------


def tree_state(base):
    """Everything verify compares of each entry under `base`, with the content itself, and
    which names are one file: equal for the source and a faithful copy."""
    found, groups = {}, {}
    for e in tree.local_entries(str(base)):
        content = (Path(base) / e.path).read_bytes() if e.kind == Kind.FILE else None
        found[e.path] = (e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.link, e.rdev, e.xattrs, content)
        if e.inode:
            groups.setdefault(e.inode, set()).add(e.path)
    return found, sorted(sorted(names) for names in groups.values())


def settled(data):
    """Wait until every entry under `data` changed longer ago than a survey's racy margin,
    so that the survey fingerprints them (see tree.RACY_NS), rather than describing each
    again whatever happens."""
    newest = max(os.lstat(p).st_ctime_ns for p in [data, *Path(data).rglob("*")])
    while time.time_ns() <= newest + tree.RACY_NS:
        time.sleep(0.05)


def live_then_swept(pair, change, harm=None, fresh=None, live_sweeps=()):
    """The live pass and its verify, then a sweep of the running source and its verify for
    each of `live_sweeps` (each called with the survey agent first, as the app writes),
    then `change(the survey agent)` on the source (the app still running, or stopping),
    then the final pass and verify, as the helper runs them. `fresh()` writes to the source
    just before the live pass; `harm()` damages the copy before the live verify. Returns
    (the final pass, files, bytes, verify's)."""
    source, data, copy, tmp_path = pair
    index, _, _ = index_now(pair)
    settled(data)
    standby = sync.Standby(source, "app")
    clean_before = time.time_ns()
    if fresh is not None:
        fresh()
    live = sync.FinalPass(standby, str(copy), index, clean_before, lambda n: None)
    live.run(live=True)
    if harm is not None:
        harm()
    changing = set()
    sync.verify(str(copy), index, problem_paths=changing)
    for write in live_sweeps:
        write(live.scan)
        standby.start(sync.Reader.DELTA, sync.Reader.DELTA)
        live = sync.FinalPass(
            standby, str(copy), index, clean_before, lambda n: None, survey=live.scan, forced=changing
        )
        live.run(live=True)
        assert live.swept
        changing = set()
        sync.verify(str(copy), index, swept=True, problem_paths=changing)
    change(live.scan)
    standby.start(sync.Reader.DELTA, sync.Reader.DELTA)
    final_pass = sync.FinalPass(
        standby, str(copy), index, clean_before, lambda n: None, survey=live.scan, forced=changing
    )
    files, sent = final_pass.run()
    return final_pass, files, sent, sync.verify(str(copy), index, swept=final_pass.swept)


def test_after_a_live_pass_the_final_pass_settles_only_what_changed(pair):
    source, data, copy, tmp_path = pair
    make_special_entries(data)
    for i in range(50):
        (data / f"dir/still-{i}").write_text(f"untouched {i}\n")
    (data / "tree/deep").mkdir(parents=True)
    (data / "tree/deep/leaf.txt").write_text("leaf\n")
    (data / "becomes-a-file").mkdir()
    (data / "becomes-a-file/inner.txt").write_text("inner\n")
    (data / "becomes-a-dir").write_text("a file\n")
    shutil.rmtree(copy)  # as rsync left it: all of it, the special entries too
    subprocess.run(["rsync", "-aHAXS", f"{data.parent}/", f"{copy}/"], check=True)

    def change(survey):
        with open(data / "big.bin", "r+b") as f:  # one block
            f.seek(3 * BLOCK + 10)
            f.write(b"changed")
        small = data / "dir/small.txt"  # same size, and the time set back: only ctime tells
        before = os.stat(small)
        small.write_text("SMALL\n")
        os.utime(small, ns=(before.st_atime_ns, before.st_mtime_ns))
        (data / "gone.txt").unlink()
        (data / "new/deeper").mkdir(parents=True)
        (data / "new/deeper/file.txt").write_text("new\n")
        (data / "link").unlink()
        os.symlink("big.bin", data / "link")
        os.chmod(data / "acl.txt", 0o600)
        os.setxattr(data / "tagged.txt", "user.mig.colour", b"red")
        shutil.rmtree(data / "becomes-a-file")
        (data / "becomes-a-file").write_text("now a file\n")
        (data / "becomes-a-dir").unlink()
        (data / "becomes-a-dir").mkdir()
        (data / "becomes-a-dir/inside.txt").write_text("inside\n")
        os.rename(data / "tree", data / "moved")  # a directory moved, all it holds with it
        with open(data / "dir/two.txt", "a") as f:  # through one name of two
            f.write("appended\n")
        os.link(data / "dir/still-7", data / "still-7-again")  # a name more for an old file

    final_pass, files, sent, (entries, problems) = live_then_swept(pair, change)
    assert final_pass.swept
    assert problems == []
    assert tree_state(data.parent) == tree_state(copy)
    assert (copy / "data/dir/small.txt").read_text() == "SMALL\n"
    # Looked at: what changed, and the directories it is in; not the 50 untouched files,
    # nor the untouched special entries.
    touched = {p for (p,) in final_pass.index.db.execute("SELECT path FROM touched")}
    assert not any("still-" in p and p != "data/dir/still-7" and "again" not in p for p in touched)
    assert "data/fifo" not in touched and "data/sparse.bin" not in touched
    assert entries == len(touched) - 2  # all but what neither side has now: gone.txt, tree
    assert sent < 2 * BLOCK + 1000  # big.bin's block, and the small files


def test_a_sweep_of_a_source_unchanged_since_the_live_pass_finds_nothing(pair):
    source, data, copy, _ = pair
    final_pass, files, sent, (entries, problems) = live_then_swept(pair, lambda survey: None)
    assert final_pass.swept
    assert (files, sent, entries, problems) == (0, 0, 0, [])
    assert tree_state(data.parent) == tree_state(copy)


def test_what_the_live_verify_found_is_looked_at_again_after_the_stop(pair):
    # A copy whose entry differs without the source changing cannot be made by the app:
    # the copy is damaged by hand between the live pass and its verify.
    source, data, copy, _ = pair
    os.setxattr(data / "dir/small.txt", "user.mig.colour", b"blue")
    os.setxattr(copy / "data/dir/small.txt", "user.mig.colour", b"blue")
    for i in range(20):
        (data / f"dir/sibling-{i}").write_text(f"{i}\n")
        shutil.copy2(data / f"dir/sibling-{i}", copy / f"data/dir/sibling-{i}")

    def harm():
        os.removexattr(copy / "data/dir/small.txt", "user.mig.colour")

    final_pass, files, sent, (entries, problems) = live_then_swept(pair, lambda survey: None, harm)
    assert final_pass.swept and problems == []
    assert os.getxattr(copy / "data/dir/small.txt", "user.mig.colour") == b"blue"
    # That entry, and its directory for its names: not every entry beside it.
    touched = {p for (p,) in final_pass.index.db.execute("SELECT path FROM touched")}
    assert touched == {"data/dir", "data/dir/small.txt"}
    assert tree_state(data.parent) == tree_state(copy)


def test_sweeps_while_the_app_runs_leave_the_last_sweep_only_what_changed_since(pair):
    source, data, copy, _ = pair
    for i in range(20):
        (data / f"dir/still-{i}").write_text(f"untouched {i}\n")

    def first(survey):
        (data / "dir/small.txt").write_text("changed before the first live sweep\n")
        (data / "gone.txt").unlink()
        (data / "later").mkdir()
        (data / "later/made.txt").write_text("made before the first live sweep\n")
        settled(data)  # or the sweep would describe them again, whatever (tree.RACY_NS)

    def second(survey):
        with open(data / "big.bin", "r+b") as f:
            f.seek(BLOCK + 1)
            f.write(b"changed before the second")
        (data / "later/made.txt").unlink()
        settled(data)

    def after(survey):
        (data / "after.txt").write_text("written after the last live sweep\n")

    final_pass, files, sent, (entries, problems) = live_then_swept(pair, after, live_sweeps=(first, second))
    assert final_pass.swept and problems == []
    assert tree_state(data.parent) == tree_state(copy)
    assert (copy / "data/dir/small.txt").read_text() == "changed before the first live sweep\n"
    assert not (copy / "data/later/made.txt").exists()
    # What the last live sweeps settled (and every entry it described was fingerprinted
    # anew) is not looked at after the stop: only the new file and its directory.
    touched = {p for (p,) in final_pass.index.db.execute("SELECT path FROM touched")}
    assert touched == {"data", "data/after.txt"}
    assert files == 1 and sent == len("written after the last live sweep\n")


def test_after_the_stop_a_big_file_and_small_ones_are_fetched_side_by_side(pair):
    # The big one goes to the second agent (FinalPass.big_requests): both arrive, whole.
    source, data, copy, _ = pair
    with open(data / "huge.bin", "wb") as f:
        f.write(os.urandom(tree.THREADED_FROM + 3 * BLOCK))
    shutil.copy2(data / "huge.bin", copy / "data/huge.bin")

    def change(survey):
        with open(data / "huge.bin", "r+b") as f:
            f.seek(tree.THREADED_FROM + BLOCK)
            f.write(b"changed after the live pass")
        (data / "dir/small.txt").write_text("changed after the live pass\n")

    final_pass, files, sent, (entries, problems) = live_then_swept(pair, change)
    assert final_pass.swept and problems == []
    assert files == 2 and sent == BLOCK + len("changed after the live pass\n")
    assert tree_state(data.parent) == tree_state(copy)


def test_after_the_stop_a_file_patched_in_place_is_fetched_as_the_sweep_finds_it(pair, monkeypatch):
    # A big file is read whole to find its changed blocks: that must not wait for the end
    # of a sweep of many entries. A new file waits: its name goes through a temporary one.
    source, data, copy, _ = pair
    with open(data / "huge.bin", "wb") as f:
        f.write(os.urandom(tree.THREADED_FROM + 3 * BLOCK))
    shutil.copy2(data / "huge.bin", copy / "data/huge.bin")
    asked = []  # (path, entries the final pass's sweep had described by then)
    request = sync.FinalPass.request

    def noting(final_pass, src, known):
        if not final_pass.live:
            asked.append((src.path, final_pass.described))
        request(final_pass, src, known)

    monkeypatch.setattr(sync.FinalPass, "request", noting)

    def change(survey):
        with open(data / "huge.bin", "r+b") as f:
            f.seek(BLOCK)
            f.write(b"changed after the live pass")
        # Described after huge.bin: a directory's entries come in the order of their names.
        (data / "zz-new.txt").write_text("new after the live pass\n")

    final_pass, files, sent, (entries, problems) = live_then_swept(pair, change)
    assert final_pass.swept and problems == []
    assert tree_state(data.parent) == tree_state(copy)
    when = dict(asked)
    assert set(when) == {"data/huge.bin", "data/zz-new.txt"}
    assert when["data/huge.bin"] < when["data/zz-new.txt"] == final_pass.described


def test_a_name_listed_just_after_it_was_made_and_then_removed_goes_from_the_copy(pair):
    # Made within the clock-tick margin of the listing, it has no fingerprint (tree.RACY_NS):
    # its going must still be noticed, though every fingerprint of its directory matches.
    source, data, copy, _ = pair

    def fresh():
        (data / "dir/brief.txt").write_text("here for a moment\n")

    def remove(survey):
        (data / "dir/brief.txt").unlink()

    final_pass, files, sent, (entries, problems) = live_then_swept(pair, remove, fresh=fresh)
    assert final_pass.swept and problems == []
    assert not (copy / "data/dir/brief.txt").exists()
    assert tree_state(data.parent) == tree_state(copy)


def test_a_sweep_holds_a_descriptor_a_level_not_one_a_directory(tmp_path):
    # An app may keep thousands of directories side by side (a cache, a mail store): more
    # than a process may have open. The survey runs with a limit of 64 here.
    for i in range(200):
        (tmp_path / "many" / f"d{i:03d}").mkdir(parents=True)
        (tmp_path / "many" / f"d{i:03d}" / "f").write_text(f"{i}\n")
    settled(tmp_path)
    program = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from migrations_app.grids.agent import tree
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
survey = tree.Survey({str(tmp_path)!r})
survey.scan(lambda line: None)
found = []
survey.sweep({{"many/d007"}}, found.append)
print(sum(text.count("\\n") for text in found))
"""
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["2"]  # the directory described again, and its directory's names


def test_what_a_process_of_the_split_sweep_writes_is_passed_on_in_whole_lines_but_its_error():
    read_end, write_end = os.pipe()
    passed, said = [], []
    reader = threading.Thread(target=tree.pass_lines_on, args=(read_end, passed.append, said))
    reader.start()
    for piece in (b"one\ntw", b"o\n", b"three\n", (tree.SWEEP_FAILED + "OSError: gone").encode()):
        os.write(write_end, piece)
    os.close(write_end)
    reader.join()
    assert "".join(passed) == "one\ntwo\nthree\n" and all(text.endswith("\n") for text in passed)
    assert said == [tree.SWEEP_FAILED + "OSError: gone"]


def test_the_last_sweep_in_processes_side_by_side_finds_what_one_would(tmp_path):
    for i in range(40):
        (tmp_path / f"d{i:02d}" / "inner").mkdir(parents=True)
        for j in range(5):
            (tmp_path / f"d{i:02d}" / f"f{j}").write_text(f"{i} {j}\n")
    settled(tmp_path)
    survey = tree.Survey(str(tmp_path))
    survey.scan(lambda line: None)
    listed = survey.seen
    (tmp_path / "d03/f1").write_text("changed\n")
    (tmp_path / "d17/f4").unlink()
    (tmp_path / "d29/inner/new").write_text("new\n")
    (tmp_path / "d40").mkdir()

    def swept(**last):
        survey.seen = listed
        found = []
        survey.sweep({"d08/f2"}, found.append, **last)
        return sorted("".join(found).splitlines())

    one = swept()
    assert any('"d03/f1"' in line for line in one) and any('"names": "d17"' in line for line in one)
    assert swept(last=True) == one


def test_a_sweep_sends_the_names_only_of_directories_that_gained_or_lost_one(tmp_path):
    # A file written to is described, but its directory lost no name: its 200 names are not
    # sent (they were, for every directory with a changed file, 85,000 names at 200,000
    # files). A name gone, or renamed, sends its directory's names, after the listing and
    # after a sweep alike.
    for name in ("written", "shrunk", "renamed", "swapped", "fresh"):
        (tmp_path / name).mkdir()
        for i in range(200):
            (tmp_path / name / f"f{i:03d}").write_text(f"{i}\n")
    (tmp_path / "other").mkdir()
    settled(tmp_path)
    survey = tree.Survey(str(tmp_path))
    survey.scan(lambda line: None)

    def sweep():
        found = []
        survey.sweep(set(), found.append)
        lines = "".join(found).splitlines()
        return {json.loads(line)["names"] for line in lines if line.startswith('{"names"')}, lines

    (tmp_path / "written/f007").write_text("written to\n")
    (tmp_path / "shrunk/f010").unlink()
    os.rename(tmp_path / "renamed/f020", tmp_path / "renamed/g020")
    os.rename(tmp_path / "swapped", tmp_path / "swapped-away")  # another in its place
    os.rename(tmp_path / "other", tmp_path / "swapped")
    named, lines = sweep()
    assert any('"written/f007"' in line for line in lines)
    assert named == {"", "shrunk", "renamed", "swapped"}

    settled(tmp_path)
    survey.sweep(set(), lambda line: None)  # the changes above, fingerprinted
    (tmp_path / "fresh/f100").write_text("written to after a sweep\n")
    (tmp_path / "shrunk/f011").unlink()
    named, lines = sweep()
    assert any('"fresh/f100"' in line for line in lines)
    assert named == {"shrunk"}


@pytest.mark.skipif(tree.SWEEP_PROCESSES < 2, reason="one CPU: the sweep after the stop runs in one process")
def test_a_process_of_the_split_sweep_that_fails_fails_the_sweep_with_its_error(tmp_path):
    # A fault injected (root reads every directory, so an unreadable one cannot be made):
    # the second process's share raises.
    class Failing(tree.Survey):
        def sweep_share(self, share, forced, cutoff, write):
            if share == 1:
                raise OSError(5, "Input/output error")
            super().sweep_share(share, forced, cutoff, write)

    (tmp_path / "d").mkdir()
    survey = Failing(str(tmp_path))
    survey.scan(lambda line: None)
    with pytest.raises(
        tree.SyncError, match=r"a process of the sweep failed \(status 1\): OSError: .*Input/output"
    ):
        survey.sweep(set(), lambda line: None, last=True)


def test_without_its_survey_the_final_pass_lists_the_stopped_source_in_full(pair):
    # As after a connection to the source that dropped between the two passes.
    source, data, copy, _ = pair

    def change(survey):
        survey.kill()
        survey.wait()
        (data / "dir/small.txt").write_text("changed once the survey had ended\n")

    final_pass, files, sent, (entries, problems) = live_then_swept(pair, change)
    assert not final_pass.swept
    assert files == 1 and problems == [] and entries == 6
    assert tree_state(data.parent) == tree_state(copy)


# --- symlinks the app made: nothing outside the app is ever read or written --------------


def snapshot_of(directory):
    """Every entry under `directory` with its content, mode and time: to show it untouched."""
    found = {}
    for path in sorted(Path(directory).rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        found[str(path.relative_to(directory))] = (st.st_mode, st.st_mtime_ns, content)
    return found


@pytest.fixture
def outside(tmp_path):
    """A directory outside both apps, with a file an app might aim a symlink at."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "f").write_text("not the app's\n")
    os.chmod(directory / "f", 0o640)
    return directory


def test_a_symlinked_directory_in_the_copy_is_never_written_through(pair, outside):
    # The review's race: the copy has `d -> outside` (rsync copied it while the source had
    # it), then the source makes `d` a real directory holding `f` before the hashing.
    source, data, copy, _ = pair
    os.symlink(outside, copy / "data/d")
    (data / "d").mkdir()
    (data / "d/f").write_text("the app's own\n")
    before = snapshot_of(outside)
    index, _, _ = index_now(pair)
    files, sent, (entries, problems) = final(pair, index)
    assert snapshot_of(outside) == before
    assert problems == []
    assert (copy / "data/d").is_dir() and not (copy / "data/d").is_symlink()
    assert (copy / "data/d/f").read_text() == "the app's own\n"


def test_a_directory_the_source_turns_into_a_symlink_is_not_read_through(pair, outside):
    # A file that was changing while hashed is fetched again after the stop. If its directory
    # on the source has become a symlink meanwhile, the source's agent must not follow it.
    source, data, copy, _ = pair
    secret = b"secret " * BLOCK
    (outside / "g").write_bytes(secret)
    (data / "e").mkdir()
    (data / "e/g").write_text("changing\n")
    (copy / "data/e").mkdir()
    (copy / "data/e/g").write_text("an older copy\n")
    index, _, _ = index_now(pair)
    shutil.rmtree(data / "e")
    os.symlink(outside, data / "e")
    files, sent, (entries, problems) = final(pair, index)
    assert sent == 0  # nothing of the outside file came across
    assert problems == []
    assert os.readlink(copy / "data/e") == str(outside)


def test_a_directory_swapped_for_a_symlink_again_and_again_never_leads_outside(pair, outside):
    # The app flips `d` between a symlink to outside and a real directory while rsync copies
    # and while the helper hashes; then it stops, and the final pass runs. Whatever moment
    # each flip hit, nothing outside changes, and the copy verifies.
    source, data, copy, tmp_path = pair
    before = snapshot_of(outside)

    def flip(flipping, label):
        while flipping.is_set():
            if (data / "d").is_symlink():
                (data / "d").unlink()
                (data / "d").mkdir()
                (data / "d/f").write_text(label * 1000)
            else:
                shutil.rmtree(data / "d", ignore_errors=True)
                os.symlink(outside, data / "d")
            os.sched_yield()

    for round in range(12):
        flipping = threading.Event()
        flipping.set()
        flipper = threading.Thread(target=flip, args=(flipping, f"round {round}\n"))
        flipper.start()
        try:
            subprocess.run(
                ["rsync", "-a", "--delete", f"{data}/", f"{copy / 'data'}/"], capture_output=True, check=False
            )
            index = sync.Index(str(tmp_path / "index.sqlite3"))
            sync.build_index(source, "app", str(copy), index)
        finally:
            flipping.clear()
            flipper.join()
        # The stopped source, whichever way the last flip left it.
        files, sent, (entries, problems) = final(pair, index, clean_before_ns=time.time_ns() + 10**9)
        assert snapshot_of(outside) == before, f"round {round}"
        assert problems == [], f"round {round}"


def test_lstats_in_turn_answer_as_one_at_a_time_would_and_follow_no_symlinked_directory(tmp_path, outside):
    base = tmp_path / "copy"
    for d in ("a", "a/b", "c"):
        (base / d).mkdir(parents=True)
    for f in ("top", "a/f1", "a/f2", "a/b/g", "c/h"):
        (base / f).write_text(f)
    os.symlink(outside, base / "via")
    copy = sync.Copy(str(base))
    # A walk's order, with a directory left and come back to, and names that are not there.
    paths = ["top", "a/f1", "a/f2", "a/b/g", "a/missing", "nowhere/x", "c/h", "a/f1", "via/f", "c/h"]

    def answers(lstat):
        found = []
        for rel in paths:
            try:
                st = lstat(rel)
                found.append((rel, st.st_ino, st.st_size))
            except OSError as e:
                found.append((rel, "not there" if sync.not_there(e) else type(e).__name__))
        return found

    with copy.in_turn() as copies:
        in_turn = answers(copies.lstat)
    assert in_turn == answers(copy.lstat)
    # Through the symlink `via`, `f` is outside the copy: never reached.
    assert ("via/f", "not there") in in_turn
    assert ("c/h", (base / "c/h").stat().st_ino, 3) in in_turn
