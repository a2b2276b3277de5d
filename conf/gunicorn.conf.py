"""gunicorn settings for MIG: `gunicorn -c conf/gunicorn.conf.py migsite.wsgi`.

MIG listens where its grid publishes the app (MIG_APP_URL, set by the grid), unless
MIG_BIND says otherwise.
"""

import os
import sys
from urllib.parse import urlsplit


def _bind():
    if bind := os.environ.get("MIG_BIND"):
        return bind
    url = urlsplit(os.environ.get("MIG_APP_URL", ""))
    if url.hostname:
        return f"{url.hostname}:{url.port or (443 if url.scheme == 'https' else 80)}"
    return "127.0.0.1:8000"


bind = [_bind()]
worker_class = "gthread"
# Load Django once, before the workers fork: they answer sooner after a start.
preload_app = True
workers = int(os.environ.get("MIG_WORKERS", "2"))
threads = int(os.environ.get("MIG_THREADS", "8"))
timeout = 60
# Requests to MIG are short; a stop should not wait long for idle keep-alive connections.
graceful_timeout = 3
# None at all: a stopping worker keeps an idle kept-alive connection open up to 2 s (for a
# request its client may be sending), and an operator's browser on the job page holds one,
# so a migration's downtime grew by that much. A connection a request costs little here.
keepalive = 0
# Access lines carry no query strings: nothing secret ends up in a log.
accesslog = "-" if os.environ.get("MIG_ACCESS_LOG") else None
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
# gunicorn's control socket defaults to one path per user: two apps on one host would
# fight over it, and MIG has no use for it.
control_socket_disable = True


def worker_exit(server, worker):
    """A worker that is done exits at once, with the status it was exiting with.

    Tearing down an interpreter with Django in it takes 0.1 s idle and 0.4 s on a busy
    host, and a stopping app is down meanwhile. Nothing is lost: requests are finished,
    every transaction they committed is in SQLite's write-ahead log (the next connection
    to open the database reads it, wherever the volume went), and log lines are flushed here.
    The status matters: it tells the arbiter that a worker failed to boot.
    """
    error = sys.exc_info()[1]
    code = error.code if isinstance(error, SystemExit) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else code if isinstance(code, int) else 1)
