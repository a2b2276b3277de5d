"""The helper's read-only status endpoint, so the monitor keeps working while MIG is down.

GET /status with `Authorization: Bearer <token>` answers the latest progress line and the
recent events as JSON. Browsers call it from MIG's page, another origin, hence CORS.
"""

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(token, snapshot):
    class Handler(BaseHTTPRequestHandler):
        server_version = "MigHelper"
        sys_version = ""

        def cors(self):
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Headers", "Authorization")
            self.send_header("Access-Control-Allow-Methods", "GET, OPTIONS")
            self.send_header("Cache-Control", "no-store")

        def do_OPTIONS(self):
            self.send_response(204)
            self.cors()
            self.end_headers()

        def do_GET(self):
            if self.path.split("?")[0] != "/status":
                return self.reply(404, {"error": "not found"})
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                return self.reply(403, {"error": "a valid token is required"})
            return self.reply(200, snapshot())

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


def serve_status(host, token, snapshot, port=0):
    """Start the endpoint on (host, port; 0: any free one) in a thread; returns the server."""
    server = ThreadingHTTPServer((host, port), make_handler(token, snapshot))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
