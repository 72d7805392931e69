"""Post-patch probes for any backend: `health.command`, `health.http` and `health.tcp`.

The backend checks its own signals first (a container's HEALTHCHECK, VMware Tools); these
probes run after, on the patchd host. Both fail closed: an error running the probe is a
failed check. A command gets the target's details in PATCHD_* environment variables and
is run without a shell, so target names reach it intact whatever characters they hold.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

from patchd.backends.base import StepFailed, Target
from patchd.config.settings import Group

_OUTPUT_TAIL = 2000


def target_environment(target: Target, facts: Mapping[str, str], group: Group) -> dict[str, str]:
    """PATCHD_GROUP, PATCHD_BACKEND, PATCHD_TARGET_{ID,NAME,KIND} and PATCHD_TARGET_<FACT>."""
    env = {
        "PATCHD_GROUP": group.name,
        "PATCHD_BACKEND": group.backend,
        "PATCHD_TARGET_ID": target.id,
        "PATCHD_TARGET_NAME": target.name,
        "PATCHD_TARGET_KIND": target.kind,
    }
    for key, value in facts.items():
        name = "PATCHD_TARGET_" + re.sub(r"[^A-Z0-9]", "_", key.upper())
        env.setdefault(name, value)
    return env


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """patchd's environment for a site command, less what would hand it patchd's secrets
    (systemd credentials such as the vCenter password), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    env.update(extra)
    return env


def run_command(
    argv: list[str], env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run argv without a shell; StepFailed when it cannot start, times out or exits non-zero."""
    try:
        proc = subprocess.run(
            argv,
            env=child_environment(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise StepFailed(f"command {argv[0]} timed out after {timeout:g}s") from None
    except OSError as err:
        raise StepFailed(f"command {argv[0]} could not run: {err.strerror}") from None
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()[-_OUTPUT_TAIL:]
        raise StepFailed(f"command {argv[0]} exited {proc.returncode}: {output}")
    return proc


def http_status(url: str, timeout: float) -> int:
    request = urllib.request.Request(url, headers={"User-Agent": "patchd"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as err:
        return err.code


def wait_for_http(url: str, status: int, timeout: float, deadline: float) -> None:
    """Poll until `url` answers `status`; StepFailed with the last answer at `deadline`."""
    last = "no answer"
    while True:
        try:
            got = http_status(url, timeout)
            if got == status:
                return
            last = f"status {got}"
        except (OSError, ValueError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() >= deadline:
            raise StepFailed(f"http check {url}: expected status {status}, got {last}")
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def wait_for_tcp(host: str, port: int, timeout: float, deadline: float) -> None:
    """Poll until a TCP connection to host:port succeeds; StepFailed at `deadline`."""
    last = "no answer"
    while True:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return
        except OSError as err:
            last = err.strerror or str(err)
        if time.monotonic() >= deadline:
            raise StepFailed(f"tcp check {host}:{port}: {last}")
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def probe(target: Target, facts: Mapping[str, str], group: Group) -> None:
    """Run the group's command and HTTP probes against a patched target."""
    health = group.health
    deadline = time.monotonic() + health.timeout.total_seconds()
    if health.command:
        env = target_environment(target, facts, group)
        run_command(health.command, env, max(1.0, deadline - time.monotonic()))
    if health.http is not None:
        wait_for_http(
            str(health.http.url),
            health.http.status,
            health.http.timeout.total_seconds(),
            deadline,
        )
    if health.tcp is not None:
        host = health.tcp.host or facts.get("ip", "")
        if not host:
            raise StepFailed("tcp check: no host given and the target reports no ip")
        wait_for_tcp(host, health.tcp.port, health.tcp.timeout.total_seconds(), deadline)
