"""The dnf driver's pure parts and its decisions on dnf's answers: the outputs below are
dnf 4.14's and rpm 4.18's own, recorded on Debian (docs/dnf-on-debian.md). The driver on
a real machine is tested in tests/integration/test_guest_dnf.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from patchd.backends.ssh import SSHBackend, SSHConfig, SSHSelect
from patchd.guest.dnf import (
    DnfDriver,
    nevr,
    parse_advisories,
    parse_installed,
    parse_transaction,
    split_nevra,
)
from patchd.guest.errors import CommandFailed, PackageManagerError
from patchd.guest.packages import Pending
from tests.unit.test_guest import _Machine, _ssh
from tests.unit.test_poll import FakeClock

TABLE = """\
Last metadata expiration check: 0:00:03 ago on Wed Dec  2 03:01:26 2026.
Dependencies resolved.
================================================================================
 Package                                        Arch      Version  Repo    Size
================================================================================
Installing:
 a-very-long-package-name-for-wrapping-tests    noarch    1.0-1    lab    6.1 k
Upgrading:
 app                                            noarch    1.1-1    lab    5.9 k
 liblab                                         noarch    1:1.1-1  lab    5.9 k
Installing dependencies:
 an-even-longer-package-name-that-dnf-wraps-onto-two-lines-in-its-table
                                                noarch    2.0-3    lab    5.9 k
Removing dependent packages:
 oldlib                                         noarch    0.9-1    @System  0
Downgrading:
 tool                                           noarch    0.9-1    lab    5.9 k

Transaction Summary
================================================================================
Install  1 Package
Upgrade  2 Packages

Total download size: 18 k
Operation aborted.
"""

UPGRADE = """\
Dependencies resolved.
================================================================================
 Package            Architecture   Version            Repository          Size
================================================================================
Upgrading:
 hello-lab          noarch         1.1-1              lab                6.0 k
 liblab             noarch         1:1.1-1            lab                5.9 k
Installing dependencies:
 libnew             noarch         2.0-1              appstream          5.9 k
Removing dependent packages:
 oldlib             noarch         0.9-1              @System              0

Transaction Summary
================================================================================
Operation aborted.
"""

LOCKED = (
    "RPMDB already locked by 20514\n  The application with PID 20514 is: python3\n"
    "    Memory : 7.6 M RSS ( 13 MB VSZ)\n"
)
REBOOT = """\
Core libraries or services have been updated since boot-up:
  * glibc
  * lab-kernel

Reboot is required to fully utilize these updates.
More information: https://access.redhat.com/solutions/27943
"""


def test_dnf_outputs_are_read_exactly() -> None:
    assert nevr("liblab", "1:1.1-1") == "liblab-1:1.1-1"  # how dnf is asked for a version
    assert split_nevra("hello-lab-1.1-1.noarch") == ("hello-lab", "1.1-1")
    assert split_nevra("openssl-libs-1:3.0.7-25.el9_3.x86_64") == (
        "openssl-libs",
        "1:3.0.7-25.el9_3",
    )
    assert parse_advisories(
        "LAB-2026-0001 Important/Sec. hello-lab-1.1-1.noarch\n"
        "RHSA-2024:1 Moderate/Sec.  openssl-libs-1:3.0.7-25.el9_3.x86_64\n"
        "RHSA-2024:2 Low/Sec.       hello-lab-1.1-1.noarch\n"
    ) == {"hello-lab": ["LAB-2026-0001", "RHSA-2024:2"], "openssl-libs": ["RHSA-2024:1"]}
    assert parse_transaction(TABLE) == {
        "a-very-long-package-name-for-wrapping-tests": ("1.0-1", "lab"),
        "app": ("1.1-1", "lab"),
        "liblab": ("1:1.1-1", "lab"),
        "an-even-longer-package-name-that-dnf-wraps-onto-two-lines-in-its-table": ("2.0-3", "lab"),
        "oldlib": None,
        "tool": ("0.9-1", "lab"),
    }
    assert parse_transaction("Dependencies resolved.\nNothing to do.\nComplete!\n") == {}
    assert parse_installed("app\t1.0-1\npackage nothere is not installed\nkernel\t5.14-1\n"
                           "kernel\t5.14-2\n") == {"app": "1.0-1", "kernel": "5.14-2"}  # fmt: skip


def test_pending_names_the_repository_and_the_security_advisory() -> None:
    fake = FakeClock()
    machine = _Machine(
        fake,
        {
            "--assumeno": [(1, UPGRADE)],
            "updateinfo": [(0, "LAB-2026-0001 Important/Sec. hello-lab-1.1-1.noarch\n")],
            "rpm": [(0, "hello-lab\t1.0-1\nliblab\t1.0-1\n")],
        },
    )
    assert DnfDriver(machine).pending() == [  # type: ignore[arg-type]
        Pending("hello-lab", "1.0-1", "1.1-1", True, "lab (LAB-2026-0001)"),
        Pending("liblab", "1.0-1", "1:1.1-1", False, "lab"),
        Pending("libnew", None, "2.0-1", False, "appstream"),  # a new dependency
    ]
    assert [key for _, key in machine.asked] == ["--assumeno", "updateinfo", "rpm"]
    machine = _Machine(fake, {"--assumeno": [(0, "Dependencies resolved.\nNothing to do.\n")]})
    assert DnfDriver(machine).pending() == []  # type: ignore[arg-type]
    machine = _Machine(
        fake, {"--assumeno": [(1, "Error: Cache-only enabled but no cache for 'lab'")]}
    )
    with pytest.raises(CommandFailed, match="no cache for 'lab'"):
        DnfDriver(machine).pending()  # type: ignore[arg-type]


def test_dnf_waits_for_its_lock_until_lock_timeout() -> None:
    fake = FakeClock()
    machine = _Machine(fake, {"makecache": [(200, LOCKED), (200, LOCKED), (0, "")]})
    DnfDriver(machine, lock_timeout=10, clock=fake.clock).refresh()  # type: ignore[arg-type]
    assert fake.slept == [2.0, 2.0]
    machine = _Machine(fake, {"makecache": [(200, LOCKED)]})
    start = fake.now
    with pytest.raises(PackageManagerError) as err:
        DnfDriver(machine, lock_timeout=5, clock=fake.clock).refresh()  # type: ignore[arg-type]
    assert str(err.value) == (
        "web1: refreshing the repository metadata (dnf makecache): the package manager's lock"
        " is still held after 5s (RPMDB already locked by 20514); nothing was changed"
    )
    assert [t - start for t, _ in machine.asked] == [0, 2, 4, 5]
    machine = _Machine(fake, {"makecache": [(1, "Error: Failed to download metadata")]})
    with pytest.raises(CommandFailed, match="Error: Failed to download metadata"):
        DnfDriver(machine, clock=fake.clock).refresh()  # type: ignore[arg-type]
    assert len(machine.asked) == 1  # any other failure: no retry


def test_an_install_outside_the_set_or_of_a_locked_package_is_refused() -> None:
    fake = FakeClock()
    pulls = (
        "Dependencies resolved.\n" + "=" * 80 + "\nUpgrading:\n"
        " app                noarch             1.1-1              lab             5.9 k\n"
        " liblab             noarch             1:1.1-1            lab             5.9 k\n"
        "\nTransaction Summary\n" + "=" * 80 + "\nUpgrade  2 Packages\nOperation aborted.\n"
    )
    machine = _Machine(
        fake, {"versionlock": [(0, "")], "--assumeno": [(1, pulls)], "-y": [(0, "")]}
    )
    driver = DnfDriver(machine, clock=fake.clock)  # type: ignore[arg-type]
    with pytest.raises(PackageManagerError) as err:
        driver.install({"app": "1.1-1"})
    assert str(err.value) == (
        "web1: installing app=1.1-1 would also install or remove liblab=1:1.1-1, which the set"
        " leaves out (held back by the baseline, or not verified by the earlier stage);"
        " nothing was changed"
    )
    assert [key for _, key in machine.asked] == ["versionlock", "--assumeno"]  # never installed
    driver.install({"app": "1.1-1", "liblab": "1:1.1-1"})
    assert [key for _, key in machine.asked][-2:] == ["--assumeno", "-y"]
    machine = _Machine(fake, {"versionlock": [(0, "!tool-2:3.0-1.*\napp-0:1.0-1.*\n")]})
    assert DnfDriver(machine).locked() == {"app", "tool"}  # type: ignore[arg-type]
    with pytest.raises(PackageManagerError, match=r"versionlocked packages .*: app; patchd"):
        DnfDriver(machine, clock=fake.clock).install({"app": "1.1-1"})  # type: ignore[arg-type]


def test_dnf_errors_and_failed_scriptlets_say_what_happened() -> None:
    fake = FakeClock()
    post = (
        "postinst of badpost fails on purpose\n"
        "warning: %post(badpost-1.1-1.noarch) scriptlet failed, exit status 1\n\n"
        "Error in POSTIN scriptlet in rpm package badpost\n"
    )
    machine = _Machine(fake, {"versionlock": [(1, "")], "--assumeno": [(0, "")], "-y": [(0, post)]})
    with pytest.raises(CommandFailed) as err:  # dnf exits 0, the new version is installed
        DnfDriver(machine, clock=fake.clock).install({"badpost": "1.1-1"})  # type: ignore[arg-type]
    assert str(err.value) == (
        "web1: installing badpost=1.1-1: %post(badpost-1.1-1.noarch) scriptlet failed,"
        " exit status 1"
    )
    excluded = (
        "All matches were filtered out by exclude filtering for argument: hello-lab-1.1-1\n"
        "Error: Unable to find a match: hello-lab-1.1-1\n"
    )
    machine = _Machine(fake, {"versionlock": [(1, "")], "--assumeno": [(1, excluded)]})
    with pytest.raises(PackageManagerError) as err:
        DnfDriver(machine, clock=fake.clock).install({"hello-lab": "1.1-1"})  # type: ignore[arg-type]
    assert str(err.value) == (
        "web1: resolving the install of hello-lab=1.1-1: dnf's excludes or a versionlock"
        " filter out hello-lab-1.1-1 (excludepkgs in dnf.conf or the .repo file, or `dnf"
        " versionlock list`); patchd never installs around them"
    )
    machine = _Machine(fake, {"-y": [(1, "Error: Unable to find a match: app-0.9-1\n")]})
    with pytest.raises(PackageManagerError, match=r"no repository offers app-0\.9-1 \(any more\)"):
        DnfDriver(machine, clock=fake.clock).downgrade({"app": "0.9-1"})  # type: ignore[arg-type]


def test_a_reboot_is_required_when_needs_restarting_says_so() -> None:
    fake = FakeClock()
    quiet = "No core libraries or services have been updated since boot-up.\n"
    machine = _Machine(fake, {"needs-restarting": [(0, quiet), (1, REBOOT)]})
    driver = DnfDriver(machine, clock=fake.clock)  # type: ignore[arg-type]
    assert driver.reboot_required() is None
    assert driver.reboot_required() == "dnf needs-restarting -r (by glibc, lab-kernel)"
    missing = "No such command: needs-restarting. Please use /usr/bin/dnf --help\n"
    machine = _Machine(fake, {"needs-restarting": [(1, missing)]})
    with pytest.raises(PackageManagerError, match="install dnf-plugins-core"):
        DnfDriver(machine, clock=fake.clock).reboot_required()  # type: ignore[arg-type]


def test_an_ssh_backend_with_package_manager_dnf_patches_with_dnf(tmp_path: Path) -> None:
    ssh = {"identity_file": str(_ssh(tmp_path).identity_file)}
    hosts = [{"name": "rhel1", "address": "10.0.0.7"}]
    backend = SSHBackend("m", {"ssh": ssh, "hosts": hosts, "package_manager": "dnf"})
    assert backend.ref == "packages:dnf"
    assert isinstance(backend.packages.driver(_Machine(FakeClock(), {})), DnfDriver)  # type: ignore[arg-type]
    assert backend.describe(backend.discover(SSHSelect())[0])["package_manager"] == "dnf"
    with pytest.raises(ValidationError, match="'apt' or 'dnf'"):
        SSHConfig.model_validate({"ssh": ssh, "package_manager": "yum"})


def test_a_rollback_downgrades_first_and_never_removes_outside_the_set() -> None:
    fake = FakeClock()
    removing = (
        "Dependencies resolved.\n" + "=" * 80 + "\nRemoving:\n"
        " libnew             noarch             2.0-1              @lab            0\n"
        "Removing dependent packages:\n"
        " tool               noarch             3.0-1              @lab            0\n"
        "\nTransaction Summary\n" + "=" * 80 + "\nOperation aborted.\n"
    )
    machine = _Machine(fake, {"-y": [(0, "")], "--assumeno": [(1, removing)]})
    with pytest.raises(PackageManagerError) as err:
        DnfDriver(machine, clock=fake.clock).downgrade({"app": "1.0-1", "libnew": None})  # type: ignore[arg-type]
    assert str(err.value) == (
        "web1: downgrading to app=1.0-1, libnew=(absent): removing libnew would also remove"
        " tool, which depend on them; not removed"
    )
    assert [key for _, key in machine.asked] == ["-y", "--assumeno"]  # app went back first
    alone = removing.replace(" tool ", " libnew ")
    machine = _Machine(fake, {"-y": [(0, "")], "--assumeno": [(1, alone)]})
    DnfDriver(machine, clock=fake.clock).downgrade({"app": "1.0-1", "libnew": None})  # type: ignore[arg-type]
    assert [key for _, key in machine.asked] == ["-y", "--assumeno", "-y"]
