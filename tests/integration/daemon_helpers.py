"""Running patchd as a real process in integration tests: `run_patchd` for one command,
the `Daemon` helper (a subprocess with a notify socket the test reads, and its JSON log),
a config writer for the lab's Docker engine, and small waiting and scraping helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import docker

from patchd import faults
from tests.integration.docker_fleet import Fleet

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def run_patchd(
    *args: str,
    fault: str | None = None,
    timeout: float = 180,
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


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        for daemon in Daemon.running:
            daemon.drain()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def write_config(path: Path, f: Fleet, state: Path, port: int, start: datetime, group: str) -> None:
    path.write_text(
        f"""
[daemon]
state_dir = "{state}"
metrics_address = "127.0.0.1:{port}"
log_format = "json"
log_level = "info"

[windows.soon]
days = ["{DAYS[start.weekday()]}"]
start = "{start:%H:%M:%S}"
duration = "1h"

[backends.lab]
type = "docker"
url = "{f.docker_host}"
timeout = "30s"

{group}
"""
    )


GROUP = """
[groups.web]
backend = "lab"
window = "soon"
select = {{ labels = {{ "patchd.test" = "{token}" }} }}
max_concurrency = {concurrency}
max_errors = 2
health = {{ timeout = "20s", stable_for = "1s" }}
"""


class Daemon:
    """A `patchd daemon` subprocess with a notify socket the test reads."""

    running: ClassVar[list[Daemon]] = []

    def __init__(self, config: Path, tmp: Path) -> None:
        Daemon.running.append(self)
        self.sock_path = tmp / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.log = (tmp / "daemon.log").open("w+")
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sock_path), "WATCHDOG_USEC": "1000000"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "patchd.cli", "daemon", "-c", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def saw(self, text: str) -> bool:
        return any(text in m for m in self.drain())

    def events(self) -> list[dict[str, Any]]:
        self.log.flush()
        self.log.seek(0)
        found = []
        for line in self.log.read().splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found

    def close(self) -> None:
        Daemon.running.remove(self)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
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
