"""Notifications reach real receivers: an SMTP server (aiosmtpd on 127.0.0.1) gets a
readable run summary through apprise's mailto; a local HTTP receiver gets the signed
webhook and checks its signature; a receiver that is down delays nothing and gets the
message once it is back.

Runs go through the runtime with FakeBackend (fast; no test bed needed); the receivers
are real servers on 127.0.0.1, and delivery is the outbox's own background thread on the
real clock.
"""

from __future__ import annotations

import email
import email.policy
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from patchd.config import load_settings
from patchd.engine import RunResult
from patchd.notifications import signing
from patchd.runtime import Runtime
from patchd.testing import FakeBackend
from tests.conftest import wait_until, write_config

SECRET = "webhook-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Mailbox:
    """An aiosmtpd handler keeping every message received."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append(parsed)  # type: ignore[arg-type]
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[int, Mailbox]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, box
    finally:
        controller.stop()


class Receiver:
    """An HTTP server on 127.0.0.1 that checks each request's signature, as a webhook
    receiver would; it can hang first and be started late (on a port chosen before)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[dict[str, Any], float]] = []  # (document, when)
        self.refused: list[str] = []
        self.server: http.server.ThreadingHTTPServer | None = None
        self.started_at: float | None = None
        self.hung: socket.socket | None = None

    def hang(self) -> None:
        """Be down the worst way: the port takes connections and never answers (a
        sender waits for its whole timeout)."""
        self.hung = socket.socket()
        self.hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.hung.bind(("127.0.0.1", self.port))
        self.hung.listen(16)

    def start(self) -> None:
        if self.hung is not None:
            self.hung.close()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                why = signing.verify(SECRET, dict(self.headers.items()), body, time.time())
                if why is not None:
                    owner.refused.append(why)
                    self.send_response(401)
                else:
                    owner.received.append((json.loads(body), time.monotonic()))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.started_at = time.monotonic()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.hung is not None:
            self.hung.close()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver(free_port())
    yield made
    made.stop()


def utcnow() -> datetime:
    return datetime.now(UTC)


def runtime_for(tmp_path: Path, channels: dict[str, Any]) -> tuple[Runtime, FakeBackend]:
    today = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][utcnow().weekday()]
    path = write_config(
        tmp_path / "patchd.toml",
        {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"today": {"days": [today], "duration": "1d"}},
            "backends": {"f": {"type": "fake"}},
            "groups": {
                "web": {
                    "backend": "f",
                    "window": "today",
                    "max_errors": 2,
                    "select": {"labels": {"tier": "web"}},
                }
            },
            "notifications": channels,
        },
    )
    fake = FakeBackend("f")
    for name in ("web-1", "web-2", "web-3"):
        fake.add(name, labels={"tier": "web"})
    fake.publish("app", "v2")
    fake.failures[("web-2", "apply")] = RuntimeError("apt-get exited 100: held packages")
    return Runtime(load_settings(path), utcnow, connector=lambda spec: fake), fake


def test_a_real_smtp_server_receives_a_readable_run_summary(
    tmp_path: Path, smtp: tuple[int, Mailbox]
) -> None:
    port, box = smtp
    runtime, _ = runtime_for(
        tmp_path,
        {
            "mail": {
                "urls": [f"mailto://127.0.0.1:{port}?from=patchd@example.com&to=ops@example.com"],
                "events": ["run_finished"],
            }
        },
    )
    runtime.outbox.start()
    try:
        result = runtime.run("web", now=True)
        assert isinstance(result, RunResult)
        wait_until(lambda: box.messages, 30, "the summary mail")
    finally:
        runtime.close()
    [mail] = box.messages
    assert mail["To"] == "ops@example.com" and mail["From"] == "patchd@example.com"
    assert mail["Subject"] == "patchd: web completed: 2 patched, 1 rolled back"
    body = mail.get_content()
    assert f"Group web, window today: run {result.run_id} completed in" in body
    assert "Patched 2, rolled back 1, rollback failed 0, left out of service 0, failed 0" in body
    assert "  web-2: rolled_back: " in body and "apt-get exited 100: held packages" in body
    assert "  web-1: app v1 -> v2 (success)" in body
    assert "<" not in body  # plain text, not HTML


def test_the_webhook_is_signed_and_a_receiver_that_is_down_delays_nothing(
    tmp_path: Path, receiver: Receiver
) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    runtime, _ = runtime_for(
        tmp_path,
        {
            "hook": {
                "webhook": f"http://127.0.0.1:{receiver.port}/patchd",
                "secret_file": secret,
                "events": ["run_finished", "rollback"],
                "timeout": "3s",
                "backoff": "1s",
                "backoff_max": "2s",
                "attempts": 30,
            }
        },
    )
    # The same run with no channel at all: the baseline the run below must keep.
    (tmp_path / "quiet").mkdir()
    quiet, _ = runtime_for(tmp_path / "quiet", {})
    try:
        began = time.monotonic()
        assert isinstance(quiet.run("web", now=True), RunResult)
        baseline = time.monotonic() - began
    finally:
        quiet.close()
    runtime.outbox.start()
    try:
        receiver.hang()  # down: connections are taken and never answered
        began = time.monotonic()
        result = runtime.run("web", now=True)
        finished = time.monotonic()
        assert isinstance(result, RunResult) and result.count("rolled_back") == 1
        # Structurally: the run finished while the receiver was still down, so no
        # delivery could have held it up; the messages wait in the outbox meanwhile.
        assert receiver.started_at is None and receiver.received == []
        wait_until(
            lambda: any(r.attempts for r in runtime.store.due_notifications()),
            15,
            "a first attempt that timed out",
        )
        # The rollback was queued mid-run and its first attempt hangs for the whole 3s
        # timeout on the delivery thread; the run did not wait for it: its time is the
        # baseline's, within noise (queueing is a journal write).
        assert finished - began < 2.5
        assert finished - began < baseline + 1.0, (finished - began, baseline)
        receiver.start()
        wait_until(
            lambda: len(receiver.received) == 2, 30, "both webhooks after the receiver came back"
        )
    finally:
        runtime.close()
    assert receiver.refused == []  # every request carried a valid signature
    assert receiver.started_at is not None
    assert all(at >= receiver.started_at > finished for _, at in receiver.received)
    documents = {doc["event"]: doc for doc, _ in receiver.received}
    assert documents["rollback"]["data"]["target"] == "web-2"
    summary = documents["run_finished"]
    assert summary["data"]["run_id"] == result.run_id
    assert summary["data"]["counts"]["success"] == 2
    assert SECRET not in json.dumps(summary)
