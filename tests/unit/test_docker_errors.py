"""A Docker engine that cannot be reached is named in plain words with a hint (issue 15):
no such socket, permission denied, connection refused; never the SDK's nest of reprs.

Real sockets and the real docker SDK; no engine is needed. Permission denied needs a
process that is not root: a forked child drops to `nobody` (skipped when not root).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchd.backends.base import BackendError
from patchd.backends.docker_engine import Engine


def ping(url: str) -> str:
    engine = Engine(url, 5)
    try:
        with engine.step(f"docker {url}"):
            engine.api.ping()
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


def test_a_missing_socket_says_so_with_a_hint(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/docker.sock"
    text = ping(url)
    assert text == (
        f"cannot reach the Docker engine at {url}: no such socket"
        " — is dockerd running, and is the backend's url right?"
    )
    assert "FileNotFoundError" not in text


def test_a_socket_nobody_listens_on_says_refused(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # bound, never listening: connect is refused
        text = ping(f"unix://{path}")
    assert "connection refused — is dockerd running" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_permission_denied_says_to_join_the_docker_group(listening: Path) -> None:
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
