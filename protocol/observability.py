"""The HTTP endpoints every role serves: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``.

They are part of the operational contract (Prometheus scrape configs and Kubernetes probes
name these paths), so both roles serve them from this one small server.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


def serve_metrics(registry: CollectorRegistry, port: int, ready: Callable[[], tuple[bool, str]],
                  host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the endpoints on a daemon thread; port 0 picks a free port (``server.server_port``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, code, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif path == "/healthz":  # liveness: the process serves requests
                body, code, ctype = b"ok\n", 200, "text/plain"
            elif path == "/readyz":  # readiness: has weights / has actors
                ok, why = ready()
                body, code, ctype = (why + "\n").encode(), 200 if ok else 503, "text/plain"
            else:
                body, code, ctype = b"not found\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):  # quiet: scrapes every few seconds
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
