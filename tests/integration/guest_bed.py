"""The lab's Debian machines and apt repository, for the guest (OS patching) tests.

`machines` (session scope) reads $PATCHD_LAB_DIR/machines/env, written by
tests/lab/machines.py when `lab.sh up` starts the bed. Tests read the machines' real
state with the OpenSSH client as root (`Bed.root`), independently of patchd's own SSH
code. Each test publishes packages under names of its own (`Bed.token`) and the
`packages` fixture withdraws and purges them afterwards, so the shared machines have
nothing pending between tests.
"""

from __future__ import annotations

import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from patchd.backends.ssh import SSHBackend
from patchd.guest.packages import identity
from tests.conftest import wait_until
from tests.integration.conftest import Lab
from tests.lab.bed import read_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
from aptrepo import AptRepo

_CLEAN = """
rm -f /var/run/reboot-required /var/run/reboot-required.pkgs
apt-mark unhold 'lab-*' >/dev/null 2>&1 || true
pkgs=$(dpkg-query -W -f '${Package}\\n' 'lab-*' 2>/dev/null)
[ -z "$pkgs" ] || DEBIAN_FRONTEND=noninteractive apt-get purge -y -q $pkgs >/dev/null
"""


@dataclass
class Bed:
    names: list[str]
    addresses: dict[str, str]
    key: Path
    known_hosts: Path
    keys_dir: Path
    control_dir: Path
    repo: AptRepo

    def root(self, name: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command as root on a machine with the OpenSSH client."""
        cmd = [
            "ssh", "-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            # One connection per machine, reused: a login costs about a second on a busy CI.
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/%C",
            "-o", "ControlPersist=120",
            f"root@{self.addresses[name]}", "--", shlex.join(argv),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if check and proc.returncode:
            raise AssertionError(f"{name}: {argv} exited {proc.returncode}: {proc.stderr[-1500:]}")
        return proc

    def wait_root(self, name: str, timeout: float = 120) -> None:
        wait_until(
            lambda: self.root(name, "true", check=False).returncode == 0,
            timeout,
            f"{name} answering SSH as root",
        )

    def installed(self, name: str, package: str) -> str | None:
        proc = self.root(
            name, "dpkg-query", "-W", "-f", "${Version} ${db:Status-Abbrev}", package, check=False
        )
        version, _, status = proc.stdout.partition(" ")
        return version if proc.returncode == 0 and status[1:2] not in ("n", "c", "") else None

    def state(self, name: str) -> str:
        return self.root(name, "systemctl", "is-system-running", check=False).stdout.strip()

    def wait_running(self, name: str, timeout: float = 60) -> str:
        """systemd's state once the machine has finished booting (running, degraded…)."""

        def settled() -> str | None:
            state = self.state(name)
            return None if state in ("initializing", "starting", "") else state

        return wait_until(settled, timeout, f"{name} to finish booting", interval=0.5)

    def boot_id(self, name: str) -> str:
        return self.root(name, "cat", "/proc/sys/kernel/random/boot_id").stdout.strip()

    def token(self) -> str:
        return secrets.token_hex(3)

    def install(self, names: list[str], versions: dict[str, str]) -> None:
        """Put packages on exact versions (as root, not through patchd)."""
        args = shlex.join(f"{p}={v}" for p, v in versions.items())
        script = (
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive"
            f" apt-get install -y -q --allow-downgrades {args}"
        )
        self.each(names, "sh", "-c", script)

    def each(self, names: list[str], *argv: str) -> None:
        """Run a command as root on several machines at once."""
        with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
            list(pool.map(lambda name: self.root(name, *argv), names))

    def audit(self, name: str) -> str:
        """dpkg's own list of half-installed or half-configured packages (empty = clean)."""
        return self.root(name, "dpkg", "--audit", check=False).stdout.strip()

    def cleanup(self) -> None:
        """Withdraw every lab-* package from the repository and purge them everywhere."""
        for suite in ("main", "security"):
            for deb in (self.repo.root / suite).glob("lab-*.deb"):
                self.repo.withdraw(deb.name.split("_")[0])
        self.each(self.names, "sh", "-c", _CLEAN)

    def backend(self, names: list[str] | None = None, **ssh: object) -> SSHBackend:
        """An ssh backend over the machines (all, or `names`), logging in as root."""
        settings = {
            "user": "root",
            "identity_file": str(self.key),
            "known_hosts": str(self.known_hosts),
        }
        settings.update(ssh)  # type: ignore[arg-type]
        hosts = [{"name": n, "address": self.addresses[n]} for n in names or self.names]
        return SSHBackend(
            "machines",
            {"hosts": hosts, "ssh": settings, "lock_timeout": "20s", "reboot_timeout": "120s",
             "rollback_timeout": "60s"},
        )  # fmt: skip


def versions_id(versions: dict[str, str | None]) -> str:
    return identity(versions)


HEALTH_TIMEOUT = timedelta(seconds=40)


@pytest.fixture(scope="session")
def machines(lab: Lab) -> Bed:
    env_file = lab.lab_dir / "machines" / "env"
    if not env_file.exists():
        pytest.fail(
            f"{env_file} missing: the lab was started without machines (PATCHD_LAB_MACHINES=0?)"
        )
    env = read_env(env_file)
    names = env["PATCHD_LAB_MACHINE_NAMES"].split()
    addresses = dict(zip(names, env["PATCHD_LAB_MACHINE_ADDRESSES"].split(), strict=True))
    key = Path(env["PATCHD_LAB_MACHINE_KEY"])
    return Bed(
        names=names,
        addresses=addresses,
        key=key,
        known_hosts=Path(env["PATCHD_LAB_MACHINE_KNOWN_HOSTS"]),
        keys_dir=key.parent,
        control_dir=key.parent.parent,
        repo=AptRepo(Path(env["PATCHD_LAB_APT_DIR"]), env["PATCHD_LAB_APT_URL"]),
    )


@pytest.fixture
def bed(machines: Bed) -> Iterator[Bed]:
    """The machines, cleaned of whatever the test published when it ends."""
    yield machines
    machines.cleanup()
