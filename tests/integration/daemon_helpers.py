"""Running patchd as a real process in integration tests: `run_patchd` for one command,
the `Daemon` helper (a subprocess with a notify socket the test reads, and its JSON log),
the daemon's config for the lab's Docker engine (through tests/conftest.py's builder),
a health probe the test holds, and a scraping helper."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import docker

from patchd import faults
from tests.conftest import window_at, write_config
from tests.integration.docker_fleet import Fleet


def run_patchd(
    *args: str,
    fault: str | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`patchd ARGS` as a process, its output captured. `fault` arms fault points
    (patchd/faults.py syntax, e.g. "docker.after_stop=crash@2"); without it none is
    armed, whatever the test's own environment says."""
    base = {k: v for k, v in os.environ.items() if k not in (faults.ENABLE, faults.SPEC)}
    if fault is not None:
        base.update({faults.ENABLE: "1", faults.SPEC: fault})
    return subprocess.run(
        [sys.executable, "-m", "patchd.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env={**base, **(env or {})},
    )


def daemon_config(
    path: Path,
    f: Fleet,
    state: Path,
    port: int,
    start: datetime,
    groups: dict[str, dict[str, Any]],
    backend_timeout: str = "30s",
    more: dict[str, Any] | None = None,
) -> Path:
    """A daemon's config for the lab's engine: JSON log, metrics on `port`, the window
    `soon` opening at `start` (in the past: open now); `more`: other top-level tables
    (`state`, `ha`)."""
    return write_config(
        path,
        {
            "daemon": {
                "state_dir": state,
                "metrics_address": f"127.0.0.1:{port}",
                "log_format": "json",
                "log_level": "info",
            },
            "windows": {"soon": window_at(start)},
            "backends": {
                "lab": {"type": "docker", "url": f.docker_host, "timeout": backend_timeout}
            },
            "groups": groups,
            **(more or {}),
        },
    )


def web_group(token: str, concurrency: int, **changes: Any) -> dict[str, dict[str, Any]]:
    """The group `web`: the fleet's containers, in window `soon`. The health timeout is a
    limit for a loaded machine; healthy containers pass in about `stable_for`."""
    group: dict[str, Any] = {
        "backend": "lab",
        "window": "soon",
        "select": {"labels": {"patchd.test": token}},
        "max_concurrency": concurrency,
        "max_errors": 2,
        "health": {"timeout": "120s", "stable_for": "1s"},
    }
    return {"web": {**group, **changes}}


def held_health(gate: Path, timeout: str = "600s") -> dict[str, Any]:
    """A `health` table whose command waits until the test creates `gate/go`: a target
    stays verifying exactly as long as the test needs (the probe writes
    `gate/NAME.probing` first). The timeout is a limit, far beyond any engine restart."""
    gate.mkdir(parents=True, exist_ok=True)
    probe = gate / "probe.sh"
    probe.write_text(
        f'touch "{gate}/$PATCHD_TARGET_NAME.probing"\n'
        f'while [ ! -e "{gate}/go" ]; do sleep 0.05; done\n'
    )
    return {"timeout": timeout, "stable_for": "1s", "command": ["sh", str(probe)]}


class Daemon:
    """A `patchd daemon` subprocess with a notify socket the test reads.

    A thread reads the socket all the time, in order, into `messages`: it holds only 10
    datagrams here (net.unix.max_dgram_qlen) and the daemon waits at most 1 s for room
    for READY and RELOADING, so a reader that looked away would lose some. `on_notify`
    is called with each message as it is read."""

    def __init__(
        self, config: Path, tmp: Path, on_notify: Callable[[str], None] | None = None
    ) -> None:
        self.sock_path = tmp / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self.on_notify = on_notify
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self.log = (tmp / "daemon.log").open("w+")
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sock_path), "WATCHDOG_USEC": "1000000"}
        self.garbled: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "patchd.cli", "daemon", "-c", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._reader.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if ready:
                self.drain()

    def drain(self) -> list[str]:
        """Every message so far: those read before and those queued now (a message the
        daemon sent before the test saw its effect is one or the other)."""
        with self._lock:
            while True:
                try:
                    message = self.sock.recv(4096, socket.MSG_DONTWAIT).decode()
                except (BlockingIOError, OSError):
                    break
                self.messages.append(message)
                if self.on_notify is not None:
                    self.on_notify(message)
            return list(self.messages)

    def saw(self, text: str) -> bool:
        return any(text in m for m in self.drain())

    def exited(self) -> str | None:
        """For wait_until's give_up: why waiting for this daemon is pointless."""
        code = self.proc.poll()
        return None if code is None else f"the daemon exited ({code})"

    def events(self) -> list[dict[str, Any]]:
        self.log.flush()
        self.log.seek(0)
        found = []
        # Whole lines only: the daemon may be writing the last one right now.
        for line in self.log.read().splitlines(keepends=True):
            if line.startswith("{") and line.endswith("\n"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    # stdout and stderr share this file: a buffered stdout write can land
                    # inside a log line. Kept for the test's failure message, not parsed.
                    self.garbled.append(line)
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._closing.set()
        self._reader.join()
        self.drain()
        self.sock.close()
        self.log.close()


def on_version(f: Fleet, names: list[str], digest: str) -> bool:
    """Every named container exists and runs `digest` (a name is briefly absent mid-patch)."""
    try:
        return all(f.digest_of(n) == digest for n in names)
    except docker.errors.NotFound:
        return False


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
