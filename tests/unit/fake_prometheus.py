"""A stand-in for Prometheus's query API (/api/v1/query) for unit tests: it records each
query and answers with the next (status, body) it was given."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

PREFIX = "/prefix"  # served under a path prefix, as behind a reverse proxy


class FakePrometheus(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[list[tuple[int, bytes]]] = []
    queries: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        assert url.path == f"{PREFIX}/api/v1/query", url.path
        self.queries.append(parse_qs(url.query)["query"][0])
        status, body = self.answers.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


def vector(*series: dict[str, str]) -> bytes:
    """A successful instant-query answer holding `series` (label sets)."""
    result = [{"metric": s, "value": [1700000000, "1"]} for s in series]
    return json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": result}}
    ).encode()


@contextmanager
def serve() -> Iterator[str]:
    """Run the fake; yields its base URL (with the prefix and a trailing slash)."""
    FakePrometheus.answers = []
    FakePrometheus.queries = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}{PREFIX}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
