"""A Docker engine that cannot be reached is named in plain words with a hint (issue 15):
no such socket, permission denied, connection refused; never the SDK's nest of reprs.
The same words from both ways of asking: the backend's ping over a local socket (no SDK,
so that the idle daemon does not load it) and any call through the SDK.

Real sockets and the real docker SDK; no engine is needed. Permission denied needs a
process that is not root: a forked child drops to `nobody` (skipped when not root).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from patchd.backends.base import BackendError
from patchd.backends.docker_engine import Engine


@pytest.fixture(params=["ping", "sdk"])
def ping(request: pytest.FixtureRequest) -> Callable[[str], str]:
    return functools.partial(_ping, sdk=request.param == "sdk")


def _ping(url: str, sdk: bool) -> str:
    engine = Engine(url, 5)
    try:
        if sdk:
            with engine.step(f"docker {url}"):
                engine.api.ping()
        else:
            engine.ping(f"docker {url}")
    except BackendError as err:
        return str(err)
    finally:
        engine.close()
    raise AssertionError("the ping succeeded")


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        yield path


def test_a_missing_socket_says_so_with_a_hint(tmp_path: Path, ping: Callable[[str], str]) -> None:
    url = f"unix://{tmp_path}/docker.sock"
    text = ping(url)
    assert text == (
        f"cannot reach the Docker engine at {url}: no such socket"
        " — is dockerd running, and is the backend's url right?"
    )
    assert "FileNotFoundError" not in text


def test_a_socket_nobody_listens_on_says_refused(
    tmp_path: Path, ping: Callable[[str], str]
) -> None:
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # bound, never listening: connect is refused
        text = ping(f"unix://{path}")
    assert "connection refused — is dockerd running" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_permission_denied_says_to_join_the_docker_group(
    listening: Path, ping: Callable[[str], str]
) -> None:
    import docker  # noqa: F401 - loaded before the child loses access to the venv

    os.chmod(listening, 0o600)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no longer root, as the service user would be
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, ping(f"unix://{listening}").encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        text = answer.read()
    os.waitpid(pid, 0)
    assert "permission denied — add the service user to the docker group" in text
    assert "PermissionError" not in text


def _answer_once(sock: socket.socket, status: str) -> None:
    conn, _ = sock.accept()
    with conn:
        conn.recv(4096)
        body = b"OK" if status.startswith("200") else b"engine is sad"
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)


def test_the_backend_ping_asks_a_local_engine_without_the_sdk(tmp_path: Path) -> None:
    """In a fresh interpreter: a ping that an engine answers leaves the docker SDK (and
    requests) unimported; the idle daemon's memory budget counts on it."""
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        server = threading.Thread(target=_answer_once, args=(sock, "200 OK"))
        server.start()
        code = (
            "import sys; from patchd.backends.docker_engine import Engine;"
            f"Engine('unix://{path}', 5).ping('docker');"
            "print(sorted(m for m in ('docker', 'requests', 'urllib3') if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        server.join(10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_engine_answering_an_error_to_the_ping_is_named_with_its_answer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        server = threading.Thread(target=_answer_once, args=(sock, "500 Internal Server Error"))
        server.start()
        text = _ping(f"unix://{path}", sdk=False)
        server.join(10)
    assert text == (
        f"docker unix://{path}: the Docker engine at unix://{path} answered HTTP 500"
        " to /_ping: engine is sad"
    )
