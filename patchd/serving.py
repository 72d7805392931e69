"""Serving a socketserver from one thread that sleeps until a request or shutdown.

socketserver's serve_forever wakes every 0.5 s to look for a shutdown request: 7,200
wake-ups an hour in an idle daemon, for each server. `SelectServing` instead sleeps in
select() on the listening socket and on one end of a socket pair; shutdown() writes to
the other end. Both the /metrics server and the control socket serve this way.
"""

from __future__ import annotations

import selectors
import socket
import threading
from socketserver import TCPServer


class SelectServing(TCPServer):
    """Mixin for a socket server (TCP, Unix or WSGI): serve_in_thread() and a shutdown()
    that wakes it. Listed first in the bases, so its shutdown() is the one used."""

    timeout = 0  # handle_request() is called only once the socket is readable

    def serve_in_thread(self, name: str) -> None:
        self._wake_read, self._wake_write = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
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
