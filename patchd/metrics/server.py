"""The /metrics HTTP server: one thread that sleeps until a scrape or shutdown."""

from __future__ import annotations

import socket
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from patchd.serving import SelectServing


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsServer(SelectServing, ThreadingMixIn, WSGIServer):
    """The /metrics HTTP server, in a thread of its own with no polling loop (not
    prometheus_client's start_http_server, whose serve_forever polls: see patchd.serving)."""

    daemon_threads = True


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` on http://HOST:PORT/metrics from a daemon thread (IPv4 or IPv6)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (MetricsServer,), {"address_family": family})
    server: MetricsServer = server_class((host, port), _QuietHandler)
    server.set_app(make_wsgi_app(registry))
    server.serve_in_thread("metrics")
    return server
