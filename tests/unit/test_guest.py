"""The pure parts of guest patching: apt's simulation output, security detection, package-set
identities, command lines, apt's error messages, the ssh backend's config and ledger.
(What needs a machine is tested on the lab's real ones: tests/integration/test_guest_*.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from patchd.backends.base import StepFailed, TransientError
from patchd.backends.ssh import SSHBackend, SSHConfig, SSHSelect
from patchd.config import load_settings
from patchd.guest import system
from patchd.guest.apt import AptDriver, is_security, parse_simulation
from patchd.guest.errors import CommandFailed, PackageManagerError, Unreachable
from patchd.guest.packages import Pending, identity
from patchd.guest.patcher import Ledger
from patchd.guest.settings import GuestModel, SshModel
from patchd.guest.ssh import Result, Session
from tests.conftest import write_config
from tests.unit.test_poll import FakeClock

SIMULATION = """\
Reading package lists...
Inst libssl3 [3.0.11-1~deb12u1] (3.0.15-1~deb12u1 Debian-Security:12/stable-security [amd64])
Inst openssl [3.0.11-1~deb12u1] (3.0.15-1~deb12u1 Debian:12.8/stable, {SEC} [amd64])
Inst tzdata [2024a-0+deb12u1] (2024b-0+deb12u1 Debian:12.8/stable-updates [all])
Inst linux-image-6.1.0-28-amd64 (6.1.119-1 Debian:12.8/stable [amd64])
Inst base-files [12.4+deb12u5] (12.4+deb12u8 Ubuntu:22.04/jammy-updates [amd64])
Conf libssl3 (3.0.15-1~deb12u1 Debian-Security:12/stable-security [amd64])
Remv oldpkg [1.0]
""".replace("{SEC}", "Debian-Security:12/stable-security")


def test_simulation_lists_every_install_with_versions_and_origin() -> None:
    assert parse_simulation(SIMULATION) == [
        Pending("base-files", "12.4+deb12u5", "12.4+deb12u8", False, "Ubuntu:22.04/jammy-updates"),
        Pending(
            "libssl3", "3.0.11-1~deb12u1", "3.0.15-1~deb12u1", True,
            "Debian-Security:12/stable-security",
        ),
        Pending("linux-image-6.1.0-28-amd64", None, "6.1.119-1", False, "Debian:12.8/stable"),
        Pending(
            "openssl", "3.0.11-1~deb12u1", "3.0.15-1~deb12u1", True,
            "Debian:12.8/stable, Debian-Security:12/stable-security",
        ),
        Pending(
            "tzdata", "2024a-0+deb12u1", "2024b-0+deb12u1", False, "Debian:12.8/stable-updates",
        ),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("source", "security"),
    [
        ("Debian-Security:bookworm-security", True),
        ("Debian:12.8/stable", False),
        ("Ubuntu:22.04/jammy-security", True),
        ("Ubuntu:22.04/jammy-updates, Ubuntu:22.04/jammy-security", True),
        ("Debian:bookworm", False),
    ],
)
def test_security_is_told_by_label_or_suite(source: str, security: bool) -> None:
    assert is_security(source) is security


def test_a_package_set_has_one_identity_whatever_the_order() -> None:
    a = identity({"b": "2", "a": "1", "new": None})
    assert a == identity({"new": None, "a": "1", "b": "2"})
    assert a != identity({"a": "1", "b": "2"})
    assert a != identity({"a": "1", "b": "2.1", "new": None})
    assert a.startswith("pkgs-") and len(a) == 21


def _ssh(tmp_path: Path, **kw: Any) -> SshModel:
    key = tmp_path / "id"
    if not key.exists():
        key.write_text("not a key")
        key.chmod(0o600)
    return SshModel.model_validate({"identity_file": str(key), **kw})


def test_command_lines_are_quoted_word_by_word(tmp_path: Path) -> None:
    plain = Session("m", "h", _ssh(tmp_path))
    assert plain.command_line(["printf", "%s", "a b; rm -rf /"]) == "printf %s 'a b; rm -rf /'"
    # sudo is asked for, but the session is not privileged: no sudo
    assert plain.command_line(["apt-get", "update"], sudo=True) == "apt-get update"
    sudo = Session("m", "h", _ssh(tmp_path, sudo=True))
    line = sudo.command_line(["apt-get", "install", "x=1"], sudo=True, env={"LC_ALL": "C"})
    assert line == "sudo -n -- env LC_ALL=C apt-get install x=1"
    # The line really is what a shell splits back into the argv.
    word = 'it\'s $(id) `id` "x"'
    out = subprocess.run(
        ["sh", "-c", plain.command_line(["printf", "%s", word])], capture_output=True, text=True
    )
    assert out.stdout == word


def test_ssh_settings_want_exactly_one_key(tmp_path: Path) -> None:
    with pytest.raises(
        ValidationError, match="exactly one of identity_file or identity_credential"
    ):
        SshModel.model_validate({})
    with pytest.raises(ValidationError, match="exactly one"):
        _ssh(tmp_path, identity_credential="key")
    with pytest.raises(ValidationError, match="not the secret itself") as err:
        SshModel.model_validate({"identity_credential": "-----BEGIN OPENSSH PRIVATE KEY-----"})
    assert "BEGIN" not in str(err.value).split("\n", 2)[1]  # the value is not echoed back
    key = tmp_path / "open"
    key.write_text("x")
    key.chmod(0o644)
    with pytest.raises(ValidationError, match="every user can read it"):
        SshModel.model_validate({"identity_file": str(key)})


def test_ssh_backend_config_and_discovery(tmp_path: Path) -> None:
    ssh = {"identity_file": str(_ssh(tmp_path).identity_file)}
    with pytest.raises(ValidationError, match="duplicate names web1"):
        SSHConfig.model_validate({"ssh": ssh, "hosts": [{"name": "web1", "address": "a"}] * 2})
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(
        '[[hosts]]\nname = "db1"\naddress = "10.0.0.9"\nlabels = { role = "db" }\n'
    )
    backend = SSHBackend(
        "m",
        {
            "ssh": ssh,
            "inventory": str(inventory),
            "hosts": [
                {"name": "web2", "address": "10.0.0.2", "labels": {"role": "web"}},
                {"name": "web1", "address": "10.0.0.1", "labels": {"role": "web"}},
            ],
        },
    )
    assert [t.name for t in backend.discover(SSHSelect())] == ["db1", "web1", "web2"]
    assert [t.name for t in backend.discover(SSHSelect(labels={"role": "web"}))] == ["web1", "web2"]
    assert [t.name for t in backend.discover(SSHSelect(names=["*1"]))] == ["db1", "web1"]
    [db] = backend.discover(SSHSelect(names=["db1"]))
    assert backend.describe(db)["address"] == "10.0.0.9"
    assert backend.plan_snapshot(db, "r1") == backend.plan_snapshot(db, "r1")


def test_the_ledger_file_resolves_sets_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    Ledger(path).add("pkgs-x", {"a": "1.1"})
    Ledger._sets.clear()  # as after a restart
    assert Ledger(path).get("pkgs-x") == {"a": "1.1"}
    assert Ledger(path).get("pkgs-unknown") is None


def _driver_failure(stderr: str, stdout: str = "") -> Exception:
    driver = AptDriver(SimpleNamespace(name="web1"))  # type: ignore[arg-type]
    return driver._failure("installing a=1", Result(("apt-get",), 100, stdout, stderr))


def test_apt_errors_say_what_to_do() -> None:
    err = _driver_failure(
        "E: dpkg was interrupted, you must manually run 'dpkg --configure -a' to correct"
        " the problem."
    )
    assert isinstance(err, PackageManagerError)
    assert "run `dpkg --configure -a` on the machine" in str(err)
    err = _driver_failure("E: Version '9.9' for 'nginx' was not found\n")
    assert isinstance(err, PackageManagerError)
    assert str(err) == "web1: installing a=1: no repository offers nginx=9.9 (any more)"
    err = _driver_failure(
        "E: Sub-process /usr/bin/dpkg returned an error code (1)\n",
        "dpkg: error processing package a (--configure):\r\n installed a package post-installation"
        " script subprocess returned error exit status 1\r\n",
    )
    assert isinstance(err, CommandFailed)
    assert "dpkg: error processing package a (--configure):; installed a package" in str(err)


def test_paramiko_is_loaded_only_when_a_session_opens() -> None:
    # The idle daemon's budget (60 MB RSS): loading the ssh backend costs no SSH library.
    code = (
        "import sys, patchd.backends.ssh, patchd.guest.apt, patchd.guest.system;"
        "print(sorted(m for m in ('paramiko', 'cryptography') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the waits, on patchd.poll with a fake clock ---------------------------------------------
# A fake session stands in for the machine: what a real one says while locked, rebooting or
# degraded is tested on the lab's machines (tests/integration/test_guest_*); here only the
# timing and the messages of the waits, without sleeping.


class _Machine:
    """Answers each command from a script (one reply per call, the last one repeated)."""

    def __init__(self, clock: FakeClock, replies: dict[str, list[Any]]) -> None:
        self.name = "web1"
        self.clock = clock
        self.replies = replies
        self.asked: list[tuple[float, str]] = []
        self.closed = 0

    def run(self, argv: Any, **kw: Any) -> Result:
        key = next(word for word in argv if word in self.replies)
        self.asked.append((self.clock.now, key))
        script = self.replies[key]
        reply = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(reply, Exception):
            raise reply
        status, out = reply
        return Result(tuple(argv), status, out, "")

    def open(self) -> _Machine:
        return self

    def close(self) -> None:
        self.closed += 1

    def __enter__(self) -> _Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LOCK = "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 812 (apt-get)"


def test_apt_waits_for_the_lock_until_lock_timeout() -> None:
    fake = FakeClock()
    machine = _Machine(fake, {"apt-get": [(100, _LOCK), (100, _LOCK), (0, "done")]})
    driver = AptDriver(machine, lock_timeout=10, clock=fake.clock)  # type: ignore[arg-type]
    assert driver._apt(["apt-get", "update"], "refreshing").stdout == "done"
    assert fake.slept == [2.0, 2.0]
    machine = _Machine(fake, {"apt-get": [(100, _LOCK)]})
    driver = AptDriver(machine, lock_timeout=5, clock=fake.clock)  # type: ignore[arg-type]
    start = fake.now
    with pytest.raises(PackageManagerError) as err:
        driver._apt(["apt-get", "update"], "refreshing")
    assert str(err.value) == (
        "web1: refreshing: the package manager's lock is still held after 5s (E: Could not"
        " get lock /var/lib/dpkg/lock-frontend. It is held by process 812 (apt-get));"
        " nothing was changed"
    )
    assert [t - start for t, _ in machine.asked] == [0, 2, 4, 5]  # the last ask at the deadline
    machine = _Machine(fake, {"apt-get": [(100, "E: Version '9' for 'a' was not found")]})
    driver = AptDriver(machine, clock=fake.clock)  # type: ignore[arg-type]
    with pytest.raises(PackageManagerError, match="no repository offers a=9"):
        driver._apt(["apt-get", "install"], "installing a=9")
    assert len(machine.asked) == 1  # any other failure: no retry


def test_a_reboot_is_waited_for_until_the_boot_id_changes() -> None:
    fake = FakeClock()
    machine = _Machine(
        fake,
        {
            "systemctl": [CommandFailed("web1: the connection dropped")],
            "cat": [(0, "old\n"), (0, "old\n"), Unreachable("web1: refused"), (0, "new\n")],
        },
    )
    assert system.reboot(lambda: machine, machine, 60, fake.clock) == "new"  # type: ignore[arg-type, return-value]
    assert fake.slept == [1.0, 1.0, 1.0]
    machine = _Machine(fake, {"systemctl": [(0, "")], "cat": [(0, "old\n")]})
    with pytest.raises(StepFailed) as err:
        system.reboot(lambda: machine, machine, 3, fake.clock)  # type: ignore[arg-type, return-value]
    assert str(err.value) == (
        "web1: did not come back from a reboot within 3s (still up with the old boot id old)"
    )


def test_wait_running_fails_once_a_bad_state_settles_or_at_the_timeout() -> None:
    fake = FakeClock()
    units = (0, "nginx.service loaded failed failed nginx\n")
    machine = _Machine(
        fake,
        {
            "is-system-running": [(1, "starting"), (1, "degraded")],
            "list-units": [units],
        },
    )
    start = fake.now
    with pytest.raises(StepFailed) as err:
        system.wait_running(lambda: machine, 60, 3, fake.clock)  # type: ignore[arg-type, return-value]
    assert str(err.value) == (
        "web1: systemctl is-system-running says degraded; failed units: nginx.service"
    )
    assert fake.now - start == 4  # starting at 0, degraded from 1, settled at 4
    assert machine.closed == 1
    machine = _Machine(fake, {"is-system-running": [Unreachable("web1: refused"), (1, "starting")]})
    start = fake.now
    with pytest.raises(StepFailed, match=r"web1: systemctl is-system-running says starting$"):
        system.wait_running(lambda: machine, 2.5, 3, fake.clock)  # type: ignore[arg-type, return-value]
    assert fake.now - start == 2.5
    machine = _Machine(
        fake, {"is-system-running": [(1, "degraded"), (0, "running")], "list-units": [(0, "")]}
    )
    start = fake.now
    system.wait_running(lambda: machine, 60, 3, fake.clock)  # type: ignore[arg-type, return-value]
    assert fake.now - start == 1  # degraded for less than `settle`: still waited for


def test_an_install_that_would_pull_in_a_package_outside_the_set_is_refused() -> None:
    fake = FakeClock()
    pulls = "Inst app [1.0] (1.1 lab:main [all])\nInst libx [1.0] (1.1 lab:main [all])\n"
    machine = _Machine(fake, {"apt-mark": [(0, "")], "-s": [(0, pulls)], "install": [(0, "")]})
    driver = AptDriver(machine, clock=fake.clock)  # type: ignore[arg-type]
    with pytest.raises(PackageManagerError) as err:
        driver.install({"app": "1.1"})
    assert str(err.value) == (
        "web1: installing app=1.1 would also install libx=1.1, which the set leaves out"
        " (held back by the baseline, or not verified by the earlier stage); nothing was changed"
    )
    assert [key for _, key in machine.asked] == ["apt-mark", "-s"]  # never installed
    driver.install({"app": "1.1", "libx": "1.1"})
    assert [key for _, key in machine.asked][-2:] == ["-s", "install"]


def test_a_vm_is_reached_at_its_tools_ip_or_by_the_address_template(tmp_path: Path) -> None:
    ssh = {"identity_file": str(_ssh(tmp_path).identity_file)}
    by_ip = GuestModel.model_validate({"ssh": ssh})
    assert by_ip.resolve("web-1", "web1.lan", "10.0.0.7") == "10.0.0.7"
    assert by_ip.resolve("web-1", "web1.lan", "") == ""  # Tools have not said yet
    by_name = GuestModel.model_validate({"ssh": ssh, "address": "{name}.servers.example"})
    assert by_name.resolve("web-1", "", "10.0.0.7") == "web-1.servers.example"
    by_host = GuestModel.model_validate({"ssh": ssh, "address": "{hostname}"})
    assert by_host.resolve("web-1", "", "10.0.0.7") == ""
    with pytest.raises(ValidationError, match=r"unknown placeholder \{ip\}"):
        GuestModel.model_validate({"ssh": ssh, "address": "{ip}"})


def test_a_vsphere_group_patched_with_apt_loads(tmp_path: Path) -> None:
    key = _ssh(tmp_path).identity_file
    password = tmp_path / "pw"
    password.write_text("pass\n")
    password.chmod(0o600)
    path = write_config(
        tmp_path / "patchd.toml",
        {
            "windows": {"w": {"days": ["sat"], "duration": "4h"}},
            "backends": {
                "vc": {
                    "type": "vsphere",
                    "host": "vc.example",
                    "username": "u",
                    "password_file": password,
                    "guest": {"ssh": {"identity_file": key}, "address": "{name}.lan"},
                }
            },
            "groups": {
                "vms": {
                    "backend": "vc",
                    "window": "w",
                    "select": {"folder": "/DC0/vm"},
                    "patch": {"method": "apt"},
                },
                "scripted": {
                    "backend": "vc",
                    "window": "w",
                    "select": {"folder": "/DC0/vm"},
                    "patch": {"command": ["true"]},
                },
            },
        },
    )
    groups = load_settings(path).groups
    assert groups["vms"].patch.method == "apt"
    assert groups["scripted"].patch.method == "command"  # the default: today's behaviour


def test_ping_checks_the_key_without_loading_paramiko(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    script = f"""
import sys
from patchd.backends.ssh import SSHBackend
ssh = {{"identity_file": {str(key)!r}}}
SSHBackend("m", {{"ssh": ssh, "hosts": [{{"name": "a", "address": "192.0.2.1"}}]}}).ping()
print("paramiko" in sys.modules, "patchd.guest.apt" in sys.modules)
# docker-py would import paramiko (30 MB) for its ssh:// transport: kept out until used.
from patchd.backends.docker_engine import sdk
sdk("unix:///var/run/docker.sock")
print("paramiko" in sys.modules)
print(sdk("ssh://engine.example").api.client.SSHHTTPAdapter.__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False", "False", "SSHHTTPAdapter"], out.stderr
    (tmp_path / "bad").write_text("ssh-ed25519 AAAA... a public key\n")
    (tmp_path / "bad").chmod(0o600)
    with pytest.raises(TransientError, match="is not a private key"):
        SSHBackend("m", {"ssh": {"identity_file": str(tmp_path / "bad")}}).ping()


def test_paramiko_loads_without_invoke_and_invoke_stays_importable() -> None:
    """paramiko's optional invoke (ssh_config `Match exec`, which patchd never reads) costs a
    tenth of a `patchd plan`: kept out of paramiko's first import, and only of that."""
    script = """
import sys
from patchd.guest.ssh import _paramiko
paramiko = _paramiko()
print(paramiko.SSHClient.__name__, "invoke" in sys.modules)
import paramiko.config
print(paramiko.config.invoke is None)
import invoke
print(invoke.__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.split() == ["SSHClient", "False", "True", "invoke"], out.stderr
