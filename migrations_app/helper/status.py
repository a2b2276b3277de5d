"""The helper's status endpoint, so the monitor keeps working while MIG is down.

GET /status with `Authorization: Bearer <token>` answers the job's status (protocol.Status)
as JSON; POST /cancel with the same token asks the helper to cancel the job, which it does
only before the commit (a rollback: the source runs again, nothing is lost), since the page
cannot ask MIG while the app is stopped. MIG's page calls it from another origin, so CORS allows exactly
MIG's own origins (the source's and the target's app URLs), and a request from any other
origin is refused. It is bounded, since it listens on the grid's app address: each
connection has a socket timeout, at most MAX_CONNECTIONS are served at once and any beyond
are closed unanswered, and once the job's outcome is old (`gone()`) it answers 410 only.

It speaks plain HTTP: where the app URL is https, a proxy in front of the grid fronts it
(see the README), or the page waits for the target's MIG instead.
"""

import hmac
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MAX_CONNECTIONS = 32
SOCKET_TIMEOUT = 10.0
MAX_BODY = 4096


def origin_of(url: str) -> str | None:
    """The origin a browser sends for a page at `url` (scheme://host[:port])."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def make_handler(
    token: str,
    snapshot: Callable[[], dict],
    origins: set[str],
    gone: Callable[[], bool],
    cancel: Callable[[str], dict] | None,
):
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "MigHelper"
        sys_version = ""
        timeout = SOCKET_TIMEOUT  # an idle or slow client loses its connection

        def cors(self):
            origin = self.headers.get("Origin")
            if origin in origins:
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
                self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Vary", "Origin")
            self.send_header("Cache-Control", "no-store")

        def foreign_origin(self):
            origin = self.headers.get("Origin")
            return origin is not None and origin not in origins

        def do_OPTIONS(self):
            if self.foreign_origin():
                return self.reply(403, {"error": "this origin may not ask"})
            self.send_response(204)
            self.cors()
            self.end_headers()

        def refused(self):
            """The reply that refuses this request, or None if it may be answered."""
            if self.foreign_origin():
                return 403, {"error": "this origin may not ask"}
            given = self.headers.get("Authorization", "").strip().encode()
            if not hmac.compare_digest(given, expected):
                return 403, {"error": "Authorization: Bearer <the job's token> is required"}
            if gone():
                return 410, {"error": "the job has ended: ask MIG"}
            return None

        def do_GET(self):
            if self.path.split("?")[0] != "/status":
                return self.reply(404, {"error": "not found"})
            if refusal := self.refused():
                return self.reply(*refusal)
            return self.reply(200, snapshot())

        def do_POST(self):
            if self.path.split("?")[0] != "/cancel" or cancel is None:
                return self.reply(404, {"error": "not found"})
            if refusal := self.refused():
                return self.reply(*refusal)
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                return self.reply(400, {"error": f"a body of at most {MAX_BODY} bytes is required"})
            try:
                by = json.loads(self.rfile.read(length) or b"{}").get("by")
            except (ValueError, AttributeError):
                return self.reply(400, {"error": 'the body is JSON: {"by": "who cancels"}'})
            who = str(by or "an operator")[:100]
            return self.reply(200, cancel(f"{who} (through the helper, while MIG was down)"))

        def reply(self, status, data):
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.cors()
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass  # requests carry the token in a header; nothing to log

    return Handler


class StatusServer(ThreadingHTTPServer):
    """A thread per connection, at most `slots` of them at a time."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # beyond the cap: closed unanswered
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve_status(
    host: str,
    token: str,
    snapshot: Callable[[], dict],
    port: int = 0,
    origins: set[str] | None = None,
    gone: Callable[[], bool] = lambda: False,
    max_connections: int = MAX_CONNECTIONS,
    cancel: Callable[[str], dict] | None = None,
) -> StatusServer:
    """Start the endpoint on (host, port; 0: any free one) in a thread; returns the server.
    `origins`: the origins (origin_of an app URL) whose pages may ask, read at each request,
    so the caller may add one later; `cancel(by)`: asks the helper to cancel."""
    handler = make_handler(token, snapshot, set() if origins is None else origins, gone, cancel)
    server = StatusServer((host, port), handler, max_connections)
    threading.Thread(target=server.serve_forever, name="status", daemon=True).start()
    return server
