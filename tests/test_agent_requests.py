"""The agent's `serve` against requests nobody sends on purpose: it answers each with an
error, keeps serving, and never touches anything outside its grid's root."""

import base64
import json
import os
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrations_app.grids.agent import ops
from migrations_app.grids.hostgrid import agent_archive

from .sshd import GRID_PYTHON

OPERATIONS = sorted(ops.OPERATIONS) + ["serve", "nonsense"]
# Arguments an attacker or a bug would try, beside random text.
TRICKY = [
    "app",
    "shop",
    "--limit",
    "99999999999999999999",
    "--offset",
    "-1",
    "--timeout",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "--grace",
    "--archive",
    "/etc/passwd",
    "../outside",
    "../../outside/f",
    "--manifest",
    '{"volumes": 5}',
    '{"components": [{"name": "c", "command": ["x"], "env": []}]}',
    '{"components": [{"name": 7, "command": [1]}], "properties": {"a": 1}}',
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "--job",
    "--job-id",
    "0",
    "--decision",
    "commit",
    "--property",
    "x=y",
    "--version",
    "1/../../x",
    "--listen-port",
    "70000",
    "\x00",
    "x" * 5000,
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
arguments = st.lists(st.sampled_from(TRICKY) | st.text(max_size=40), max_size=8)
inputs = st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=20)
requests = (
    st.builds(lambda op, args: json.dumps([op, *args]), st.sampled_from(OPERATIONS), arguments)
    | st.builds(
        lambda op, args, data: json.dumps({"argv": [op, *args], "input": data}),
        st.sampled_from(OPERATIONS),
        arguments,
        inputs,
    )
    | json_values.map(json.dumps)
    | st.binary(max_size=60).map(lambda b: b.decode("latin-1"))
)


def serving_agent(tmp_path, root):
    archive = tmp_path / "agent.pyz"  # as MIG installs it
    archive.write_bytes(agent_archive())
    agent = subprocess.Popen(
        [GRID_PYTHON, str(archive), str(root), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )

    def ask(line):
        agent.stdin.write(line.encode("utf-8", "surrogateescape").replace(b"\n", b" ") + b"\n")
        agent.stdin.flush()
        reply = agent.stdout.readline()
        assert reply, f"the agent stopped serving after {line[:200]!r}"
        return json.loads(reply)

    return agent, ask


def snapshot_of(directory):
    return {
        str(p.relative_to(directory)): (p.lstat().st_mode, p.lstat().st_mtime_ns, p.lstat().st_size)
        for p in sorted(Path(directory).rglob("*"))
    }


def test_any_request_gets_an_answer_and_nothing_outside_changes(tmp_path):
    root = tmp_path / "grid"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("not the grid's\n")
    (tmp_path / "grid.json").write_text("{}")
    agent, ask = serving_agent(tmp_path, root)
    try:
        assert ask(json.dumps(["init", "--name", "fuzz"]))["ok"] is True
        before = snapshot_of(tmp_path / "outside"), (tmp_path / "grid.json").read_text()

        @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(requests)
        def one(line):
            reply = ask(line)
            assert isinstance(reply, dict) and reply.get("ok") in (True, False), reply
            assert len(reply.get("message", "")) <= ops.MESSAGE_LIMIT
            assert ask(json.dumps(["info"]))["ok"] is True  # and it still serves

        one()
        assert (snapshot_of(tmp_path / "outside"), (tmp_path / "grid.json").read_text()) == before
        assert {p.name for p in tmp_path.iterdir()} == {"grid", "outside", "grid.json", "agent.pyz"}
    finally:
        agent.stdin.close()
        agent.wait(timeout=30)
    assert agent.returncode == 0


def test_numbers_out_of_range_are_refused_before_anything_runs(tmp_path):
    root = str(tmp_path / "grid")
    ops.answer([root, "init", "--name", "g"])
    for argv, expected in [
        (["start", "app", "--timeout", "nan"], "--timeout: must be a number from 0.0 to 604800.0, not 'nan'"),
        (["read", "app", "f", "--limit", str(1 << 40)], "--limit: must be a number from 0 to 16777216"),
        (["read", "app", "f", "--offset", "-5"], "--offset: must be a number from 0"),
        (
            ["install-template", "t", "--archive", "/etc/passwd", "--version", "1"],
            "invalid archive '/etc/passwd'",
        ),
        (["state", "x" * 100_000], "invalid app name 'xxxxxxxx"),
    ]:
        reply = ops.answer([root, *argv])
        assert reply["ok"] is False and expected in reply["message"], (argv, reply)
        assert len(reply["message"]) < 200


def test_install_template_deletes_only_its_own_archive(tmp_path):
    root = tmp_path / "grid"
    ops.answer([str(root), "init", "--name", "g"])
    victim = tmp_path / "precious.tar.gz"
    victim.write_bytes(b"not MIG's")
    for archive in [victim, root / ".mig" / "tmp-nothex.tar.gz", root / ".mig" / ".." / "precious.tar.gz"]:
        argv = [str(root), "install-template", "t", "--archive", str(archive), "--version", "1"]
        reply = ops.answer(argv)
        assert reply["ok"] is False and "invalid archive" in reply["message"]
    assert victim.read_bytes() == b"not MIG's"
    assert set(os.listdir(tmp_path)) == {"grid", "precious.tar.gz"}


def test_a_served_put_takes_its_data_in_the_request_and_nothing_else_does(tmp_path):
    root = tmp_path / "grid"
    agent, ask = serving_agent(tmp_path, root)
    try:
        assert ask(json.dumps(["init", "--name", "g"]))["ok"] is True
        manifest = json.dumps({"volumes": ["data"], "components": []})
        assert ask(json.dumps(["define", "shop", "--manifest", manifest]))["ok"] is True
        data = bytes(range(256)) * 3  # not text: it travels as base64
        put = ["put", "shop", "volumes/data/blob", "--mode", "416"]
        reply = ask(json.dumps({"argv": put, "input": base64.b64encode(data).decode()}))
        assert reply == {"ok": True, "result": {"written": len(data)}}
        written = root / "apps/shop/volumes/data/blob"
        assert written.read_bytes() == data and written.stat().st_mode & 0o777 == 0o640
        # Without its data, a served put would read the requests that follow: refused.
        reply = ask(json.dumps(put))
        assert reply["ok"] is False and "needs its input in the request" in reply["message"]
        reply = ask(json.dumps({"argv": ["state", "shop"], "input": ""}))
        assert reply["ok"] is False and "state takes no input" in reply["message"]
        reply = ask(json.dumps({"argv": put, "input": "not base64!"}))
        assert reply["ok"] is False and reply["message"].startswith("bad request")
        assert written.read_bytes() == data
    finally:
        agent.stdin.close()
        agent.wait(timeout=30)
