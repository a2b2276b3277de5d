"""The helper's status endpoint: the job's token as a Bearer, MIG's origins only, bounded;
and its cancel, for the page while MIG is down."""

import http.client
import json
import socket
import threading
import time

import pytest

from migrations_app.helper import status

TOKEN = "t0ken-of-the-job"
SOURCE_URL, TARGET_URL = "http://127.0.0.2:8080/", "https://shop.example/"
TARGET = "https://shop.example"


CANCELS = []


@pytest.fixture
def endpoint():
    gone = threading.Event()
    origins = {status.origin_of(SOURCE_URL)}
    CANCELS.clear()
    server = status.serve_status(
        "127.0.0.1",
        TOKEN,
        lambda: {"job": 7, "phase": "precopy"},
        origins=origins,
        gone=gone.is_set,
        cancel=lambda by: CANCELS.append(by) or {"requested": True},
    )
    # The target's URL is known once the helper has defined it: its origin comes later.
    origins.add(status.origin_of(TARGET_URL))
    yield server, gone
    server.shutdown()
    server.server_close()


@pytest.fixture
def capped():
    """An endpoint that serves 4 connections at once. Only the test of the cap uses so few:
    a slot is freed a moment after its connection closes, so quick requests one after the
    other may find a small cap full."""
    server = status.serve_status("127.0.0.1", TOKEN, dict, max_connections=4)
    yield server
    server.shutdown()
    server.server_close()


def ask(server, method="GET", path="/status", body=None, **headers):
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        body = response.read()
        return response.status, dict(response.getheaders()), json.loads(body) if body else None
    finally:
        connection.close()


def test_the_token_must_come_as_a_bearer(endpoint):
    server, _ = endpoint
    assert ask(server, Authorization=f"Bearer {TOKEN}")[0] == 200
    assert ask(server, Authorization=f"Bearer {TOKEN}")[2] == {"job": 7, "phase": "precopy"}
    for wrong in (TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", ""):
        code, _, body = ask(server, Authorization=wrong)
        assert code == 403 and "Bearer" in body["error"], wrong
    assert ask(server, "GET", "/elsewhere", Authorization=f"Bearer {TOKEN}")[0] == 404


def test_only_mig_s_own_origins_may_ask(endpoint):
    server, _ = endpoint
    for origin in ("http://127.0.0.2:8080", "https://shop.example"):
        code, headers, _ = ask(server, Authorization=f"Bearer {TOKEN}", Origin=origin)
        assert code == 200 and headers["Access-Control-Allow-Origin"] == origin
        code, headers, _ = ask(server, "OPTIONS", Origin=origin)
        assert code == 204 and headers["Access-Control-Allow-Origin"] == origin
    for origin in ("http://evil.example", "http://127.0.0.2:8081", "null"):
        code, headers, _ = ask(server, Authorization=f"Bearer {TOKEN}", Origin=origin)
        assert code == 403 and "Access-Control-Allow-Origin" not in headers
        assert ask(server, "OPTIONS", Origin=origin)[0] == 403


def test_a_cancel_needs_the_token_and_says_who_asked(endpoint):
    server, _ = endpoint
    auth = {"Authorization": f"Bearer {TOKEN}"}
    code, headers, said = ask(server, "POST", "/cancel", json.dumps({"by": "alice"}), Origin=TARGET, **auth)
    assert code == 200 and said == {"requested": True}
    assert headers["Access-Control-Allow-Origin"] == TARGET
    assert CANCELS == ["alice (through the helper, while MIG was down)"]
    assert ask(server, "POST", "/cancel", "{}", Authorization="Bearer wrong")[0] == 403
    assert (
        ask(server, "POST", "/cancel", "{}", Authorization=f"Bearer {TOKEN}", Origin="http://evil.example")[0]
        == 403
    )
    assert ask(server, "POST", "/cancel", "not json", Authorization=f"Bearer {TOKEN}")[0] == 400
    assert ask(server, "POST", "/cancel", "x" * 5000, Authorization=f"Bearer {TOKEN}")[0] == 400
    assert ask(server, "POST", "/status", "{}", Authorization=f"Bearer {TOKEN}")[0] == 404
    assert len(CANCELS) == 1


def test_once_the_job_has_ended_it_says_only_that(endpoint):
    server, gone = endpoint
    gone.set()
    code, _, body = ask(server, Authorization=f"Bearer {TOKEN}")
    assert code == 410 and body == {"error": "the job has ended: ask MIG"}
    assert ask(server, Authorization="Bearer wrong")[0] == 403


def test_idle_connections_beyond_the_cap_are_refused(capped):
    server = capped
    idle = [socket.create_connection(server.server_address[:2]) for _ in range(4)]
    try:
        # Every slot is held by a silent client: one more is closed unanswered.
        extra = socket.create_connection(server.server_address[:2])
        extra.settimeout(10)
        extra.sendall(f"GET /status HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        assert extra.recv(100) == b""
        extra.close()
    finally:
        for s in idle:
            s.close()
    # Their slots come back once they go, and the endpoint answers again.
    assert ask_once_a_slot_is_free(server) == 200


def ask_once_a_slot_is_free(server, within=60.0):
    """The status code of the first request answered: a slot is released only after its
    connection was closed, so a request right after that may still find every slot taken."""
    pause = threading.Event()  # never set: a wait that is only a pause
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            return ask(server, Authorization=f"Bearer {TOKEN}")[0]
        except (ConnectionError, http.client.RemoteDisconnected):
            pause.wait(0.05)
    raise AssertionError("the endpoint never answered again")


def test_a_silent_client_is_dropped_after_the_socket_timeout(monkeypatch):
    monkeypatch.setattr(status, "SOCKET_TIMEOUT", 0.5)
    server = status.serve_status("127.0.0.1", TOKEN, dict, max_connections=1)
    try:
        silent = socket.create_connection(server.server_address[:2])
        silent.settimeout(10)
        assert silent.recv(100) == b""  # the server hung up on it
        assert ask_once_a_slot_is_free(server) == 200  # and its slot is free again
    finally:
        server.shutdown()
        server.server_close()
