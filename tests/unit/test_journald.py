"""patchd under systemd's journal (issue 15): each line carries its priority when stderr
is the journal stream, every event names its logger, and a long start-up tells systemd
it is progress (EXTEND_TIMEOUT_USEC) before READY=1.

A pipe stands in for the journal's stream (JOURNAL_STREAM names its device and inode, as
systemd does) and a real datagram socket for NOTIFY_SOCKET.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd import log
from patchd.daemon import Daemon
from patchd.systemd import Notifier
from patchd.testing import FakeBackend
from tests.conftest import write_config
from tests.unit.test_daemon import config


@pytest.fixture
def pipe() -> Iterator[tuple[object, int]]:
    read, write = os.pipe()
    stream = os.fdopen(write, "w", buffering=1)
    yield stream, read
    stream.close()
    os.close(read)


def lines(read: int) -> list[str]:
    return os.read(read, 65536).decode().splitlines()


def test_lines_carry_priorities_when_stderr_is_the_journal(
    pipe: tuple[object, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream, read = pipe
    status = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    log.setup("json", "info", stream)  # type: ignore[arg-type]
    logger = log.get("patchd.test")
    logger.info("one")
    logger.warning("two")
    logger.error("three")
    got = lines(read)
    assert [line[:3] for line in got] == ["<6>", "<4>", "<3>"]
    first = json.loads(got[0][3:])
    assert first["event"] == "one" and first["logger"] == "patchd.test"


def test_no_priorities_when_stderr_is_not_the_journal(
    pipe: tuple[object, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream, read = pipe
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    log.setup("json", "info", stream)  # type: ignore[arg-type]
    log.get("patchd.test").error("plain")
    [line] = lines(read)
    assert json.loads(line)["event"] == "plain"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_start_up_extends_the_start_timeout_before_ready(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    fake = FakeBackend("d")
    fake.add("c1")
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    path = write_config(tmp_path / "patchd.toml", config(tmp_path / "state", start))
    notifier = Notifier(notify_socket.getsockname())
    daemon = Daemon(path, None, connector=lambda spec: fake, notifier=notifier)
    daemon.start()
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify_socket.recv(4096).decode())
    finally:
        daemon.shutdown()
    assert messages[0] == "EXTEND_TIMEOUT_USEC=60000000"


def test_extending_repeats_while_the_block_runs(notify_socket: socket.socket) -> None:
    import time

    notifier = Notifier(notify_socket.getsockname())
    with notifier.extending(timedelta(seconds=0.3)):
        time.sleep(0.5)
    got = []
    notify_socket.settimeout(0.1)
    try:
        while True:
            got.append(notify_socket.recv(4096).decode())
    except TimeoutError:
        pass
    assert len(got) >= 2 and set(got) == {"EXTEND_TIMEOUT_USEC=300000"}
