"""sd_notify messages, received on a real unix datagram socket."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from patchd.systemd import Notifier, watchdog_interval


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier(str(path))
        assert notifier.ready("idle")
        message = sock.recv(4096).decode()
        assert message.splitlines()[:2] == ["READY=1", "STATUS=idle"]
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping("bye")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_abstract_socket() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0patchd-test-notify")
        assert Notifier("@patchd-test-notify").status("x")
        assert sock.recv(100) == b"STATUS=x"


def test_without_socket_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready("idle")


def test_unreachable_socket_is_not_an_error(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "missing.sock")).ready("idle")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    interval = watchdog_interval()
    assert interval is not None and interval.total_seconds() == 15
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


def test_a_full_socket_never_blocks_the_sender(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier(str(path))
        results = [notifier.status(f"line {i}") for i in range(2000)]  # nobody reads
        assert results[0] is True
        assert results[-1] is False


def test_state_changes_wait_for_room_and_status_does_not(tmp_path: Path) -> None:
    """READY/RELOADING/STOPPING are replaced by nothing: in a full queue they wait up to
    `announce_wait` (a dropped READY=1 after RELOADING=1 leaves systemd waiting)."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier(str(path))
        notifier.announce_wait = 0.05
        while notifier.status("filler"):
            pass
        assert not notifier.status("x")  # at once (see the test above)
        for announce in (lambda: notifier.ready("x"), notifier.reloading, notifier.stopping):
            started = time.monotonic()
            assert not announce()
            assert time.monotonic() - started >= 0.04  # poll() rounds to ms
        sock.recv(4096)  # room for one
        assert notifier.reloading()
