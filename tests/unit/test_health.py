"""health.command and health.http probes, against real processes and a real HTTP server."""

from __future__ import annotations

import http.server
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import ClassVar

import pytest

from patchd.backends.base import StepFailed, Target
from patchd.config.schema import HealthModel, HttpCheckModel
from patchd.health import probe, target_environment
from tests.unit.test_engine import group

TARGET = Target(id="abc", name="web-1; rm -rf / $(id)", kind="container")


def test_command_gets_target_details_and_odd_names_intact(tmp_path: object) -> None:
    script = (
        "import os, sys; "
        "sys.exit(0 if os.environ['PATCHD_TARGET_NAME'] == sys.argv[1] "
        "and os.environ['PATCHD_TARGET_IMAGE'] == 'app:2' else 3)"
    )
    grp = group(health=HealthModel(command=[sys.executable, "-c", script, TARGET.name]))
    probe(TARGET, {"image": "app:2"}, grp)


def test_failing_command_fails_with_its_output() -> None:
    grp = group(
        health=HealthModel(command=[sys.executable, "-c", "print('db not ready'); exit(4)"])
    )
    with pytest.raises(StepFailed, match="exited 4: db not ready"):
        probe(TARGET, {}, grp)


def test_missing_command_fails_closed() -> None:
    grp = group(health=HealthModel(command=["/nonexistent/check"]))
    with pytest.raises(StepFailed, match="could not run"):
        probe(TARGET, {}, grp)


def test_command_timeout() -> None:
    grp = group(
        health=HealthModel(
            timeout=timedelta(seconds=1),
            command=[sys.executable, "-c", "import time; time.sleep(30)"],
        )
    )
    with pytest.raises(StepFailed, match="timed out"):
        probe(TARGET, {}, grp)


def test_environment_names() -> None:
    env = target_environment(TARGET, {"ip-address": "10.0.0.1"}, group())
    assert env["PATCHD_TARGET_IP_ADDRESS"] == "10.0.0.1"
    assert env["PATCHD_GROUP"] == "web"
    assert env["PATCHD_TARGET_ID"] == "abc"


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        code = self.answers.pop(0) if self.answers else 200
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/healthz"
    httpd.shutdown()


def test_http_probe_waits_for_the_expected_status(server: str) -> None:
    _Handler.answers = [503, 200]
    grp = group(health=HealthModel(http=HttpCheckModel(url=server)))  # type: ignore[arg-type]
    probe(TARGET, {}, grp)
    assert _Handler.answers == []


def test_http_probe_fails_after_the_timeout(server: str) -> None:
    _Handler.answers = [500] * 50
    grp = group(
        health=HealthModel(
            timeout=timedelta(seconds=1),
            http=HttpCheckModel(url=server),  # type: ignore[arg-type]
        )
    )
    with pytest.raises(StepFailed, match="expected status 200, got status 500"):
        probe(TARGET, {}, grp)


def test_http_probe_unreachable_fails_closed() -> None:
    grp = group(
        health=HealthModel(
            timeout=timedelta(seconds=1),
            http=HttpCheckModel(url="http://127.0.0.1:9/x"),  # type: ignore[arg-type]
        )
    )
    with pytest.raises(StepFailed, match="http check"):
        probe(TARGET, {}, grp)


def test_tcp_probe_uses_the_target_ip_and_fails_closed() -> None:
    import socket

    from patchd.config.schema import TcpCheckModel

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe(TARGET, {"ip": "127.0.0.1"}, group(health=HealthModel(tcp=TcpCheckModel(port=port))))
    closed = group(health=HealthModel(timeout=timedelta(seconds=1), tcp=TcpCheckModel(port=port)))
    with pytest.raises(StepFailed, match=r"tcp check 127\.0\.0\.1"):
        probe(TARGET, {"ip": "127.0.0.1"}, closed)
    with pytest.raises(StepFailed, match="no ip"):
        probe(TARGET, {}, closed)


def test_commands_do_not_inherit_the_credentials_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/patchd.service")
    script = "import os, sys; sys.exit(3 if 'CREDENTIALS_DIRECTORY' in os.environ else 0)"
    probe(TARGET, {}, group(health=HealthModel(command=[sys.executable, "-c", script])))
