"""The lab's rpm machines (Debian with dnf and an rpm database, tests/lab/rpmlab.py) and
their rpm repository, for the dnf driver's tests.

`rpm_machines` (session scope) reads the rpm part of $PATCHD_LAB_DIR/machines/env. The
machines are reached and read as the apt machines are (`Bed.root`, the OpenSSH client as
root, independent of patchd's SSH code); installed versions come from rpm itself. Packages
are built and indexed inside the first rpm machine. Each test publishes names of its own
(`Bed.token`); `rpm_bed` withdraws and removes every lab-* package afterwards.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from patchd.backends.ssh import SSHBackend
from tests.integration.conftest import Lab
from tests.integration.guest_bed import Bed
from tests.lab.aptrepo import AptRepo
from tests.lab.bed import read_env
from tests.lab.rpmlab import RpmRepo

_CLEAN = """
pkgs=$(rpm -qa --qf '%{NAME}\\n' 'lab-*' | grep -vx lab-system)
[ -z "$pkgs" ] || dnf -q -y remove $pkgs >/dev/null
dnf -q versionlock clear >/dev/null 2>&1 || true
"""


@dataclass
class RpmBed(Bed):
    rpm: RpmRepo

    def installed(self, name: str, package: str) -> str | None:
        proc = self.root(name, "rpm", "-q", "--qf", "%{VERSION}-%{RELEASE}", package, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def install(self, names: list[str], versions: dict[str, str]) -> None:
        """Put packages on exact versions (as root with dnf, not through patchd).
        --refresh: with metadata_expire=0 dnf still trusts metadata fetched within the
        same second, and a version published just now would not be found."""
        args = shlex.join(f"{p}-{v}" for p, v in versions.items())
        self.each(names, "sh", "-c", f"dnf -q -y --refresh install {args} >/dev/null")

    def cleanup(self) -> None:
        self.rpm.withdraw("lab-*")
        self.each(self.names, "sh", "-c", _CLEAN)

    def backend(self, names: list[str] | None = None, **ssh: object) -> SSHBackend:
        backend = super().backend(names, **ssh)
        config = backend.config.model_copy(update={"package_manager": "dnf"})
        return SSHBackend("machines", config)


@pytest.fixture(scope="session")
def rpm_machines(lab: Lab) -> RpmBed:
    env_file = lab.lab_dir / "machines" / "env"
    env = read_env(env_file) if env_file.exists() else {}
    names = env.get("PATCHD_LAB_RPM_MACHINE_NAMES", "").split()
    if not names:
        pytest.fail(
            f"{env_file}: no rpm machines (the lab was started with PATCHD_LAB_MACHINES=0"
            " or PATCHD_LAB_RPM_MACHINES=0)"
        )
    addresses = dict(zip(names, env["PATCHD_LAB_RPM_MACHINE_ADDRESSES"].split(), strict=True))
    key = Path(env["PATCHD_LAB_MACHINE_KEY"])
    builder = names[0]

    def run(script: str) -> object:
        return bed.root(builder, "sh", "-c", script)

    bed = RpmBed(
        names=names,
        addresses=addresses,
        key=key,
        known_hosts=Path(env["PATCHD_LAB_MACHINE_KNOWN_HOSTS"]),
        keys_dir=key.parent,
        control_dir=key.parent.parent,
        repo=AptRepo(Path(env["PATCHD_LAB_APT_DIR"]), env["PATCHD_LAB_APT_URL"]),
        rpm=RpmRepo(Path(env["PATCHD_LAB_RPM_DIR"]), run),
    )
    return bed


@pytest.fixture
def rpm_bed(rpm_machines: RpmBed) -> Iterator[RpmBed]:
    """The rpm machines, cleaned of whatever the test published when it ends."""
    yield rpm_machines
    rpm_machines.cleanup()
