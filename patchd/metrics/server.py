"""The /metrics HTTP server: one thread that sleeps until a scrape or shutdown."""

from __future__ import annotations

import selectors
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """The /metrics HTTP server, serving in a thread of its own with no polling loop.

    prometheus_client's start_http_server runs socketserver's serve_forever, which wakes
    every 0.5 s to look for a shutdown request: 7,200 wake-ups an hour in an idle daemon.
    This thread sleeps in select() until a scrape arrives or shutdown() wakes it.
    """

    daemon_threads = True
    timeout = 0  # handle_request() is called only once the socket is readable

    def serve_in_thread(self) -> None:
        self._wake_read, self._wake_write = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj is self._wake_read for key, _ in ready):
                    return
                self.handle_request()

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        self._wake_write.send(b"x")
        self._thread.join()
        self.server_close()
        self._wake_read.close()
        self._wake_write.close()


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` on http://HOST:PORT/metrics from a daemon thread (IPv4 or IPv6)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (MetricsServer,), {"address_family": family})
    server: MetricsServer = server_class((host, port), _QuietHandler)
    server.set_app(make_wsgi_app(registry))
    server.serve_in_thread()
    return server
