"""patchd's SSH sessions and apt driver against the lab's real sshd and apt: host keys
(unknown, changed, trusted on first use), sudo, held packages, the dpkg lock."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from patchd.guest.apt import AptDriver
from patchd.guest.errors import AuthFailed, HostKeyRejected, PackageManagerError, SudoDenied
from patchd.guest.settings import SshModel
from patchd.guest.ssh import Session
from tests.integration.guest_bed import Bed, bed, machines

__all__ = ["bed", "machines"]  # fixtures


def fingerprint_of(pub: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[1]  # "256 SHA256:... comment (ED25519)"


def settings(bed: Bed, known_hosts: Path, **kw: object) -> SshModel:
    values: dict[str, object] = {
        "user": "root",
        "identity_file": str(bed.key),
        "known_hosts": str(known_hosts),
        "connect_timeout": "10s",
    }
    values.update(kw)
    return SshModel.model_validate(values)


def test_an_unknown_host_key_is_refused_with_its_fingerprint(bed: Bed, tmp_path: Path) -> None:
    name = bed.names[0]
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(HostKeyRejected) as err:
        Session(name, bed.addresses[name], settings(bed, known)).open()
    expected = fingerprint_of(bed.keys_dir / name / "ssh_host_ed25519_key.pub")
    assert f"unknown host key ssh-ed25519 {expected}" in str(err.value)
    assert str(known) in str(err.value)
    assert known.read_text() == ""  # nothing was trusted


def test_a_changed_host_key_is_refused(bed: Bed, tmp_path: Path) -> None:
    name = bed.names[0]
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, blob = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"{bed.addresses[name]} {kind} {blob}\n")
    with pytest.raises(HostKeyRejected) as err:
        Session(name, bed.addresses[name], settings(bed, known)).open()
    real = fingerprint_of(bed.keys_dir / name / "ssh_host_ed25519_key.pub")
    message = str(err.value)
    assert "host key CHANGED" in message
    assert real in message
    assert fingerprint_of(other.with_suffix(".pub")) in message


def test_trust_on_first_use_records_the_key(bed: Bed, tmp_path: Path) -> None:
    name = bed.names[0]
    known = tmp_path / "known_hosts"
    with Session(name, bed.addresses[name], settings(bed, known, trust_on_first_use=True)) as s:
        assert s.run(["id", "-un"]).stdout.strip() == "root"
    pub = (bed.keys_dir / name / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    assert known.read_text() == f"{bed.addresses[name]} {pub[0]} {pub[1]}\n"
    # Now known: a strict session accepts it.
    with Session(name, bed.addresses[name], settings(bed, known)) as s:
        assert s.run(["true"]).status == 0


def test_arguments_reach_the_machine_as_they_are(bed: Bed) -> None:
    name = bed.names[0]
    word = "it's $(touch /tmp/pwned); `id` > x"
    with Session(name, bed.addresses[name], settings(bed, bed.known_hosts)) as s:
        assert s.run(["printf", "%s", word]).stdout == word
        assert s.run(["test", "-e", "/tmp/pwned"], check=False).status == 1


def test_sudo_without_the_right_is_a_clear_error(bed: Bed) -> None:
    name = bed.names[0]
    denied = settings(bed, bed.known_hosts, user="nosudo", sudo=True)
    with Session(name, bed.addresses[name], denied) as s, pytest.raises(SudoDenied) as err:
        AptDriver(s).refresh()
    message = str(err.value)
    assert "user 'nosudo' may not run `apt-get -q" in message
    assert "sudo -n" in message
    assert "NOPASSWD" in message
    allowed = settings(bed, bed.known_hosts, user="patchd", sudo=True)
    with Session(name, bed.addresses[name], allowed) as s:
        assert s.run(["id", "-u"], sudo=True).stdout.strip() == "0"
        assert s.run(["id", "-u"]).stdout.strip() != "0"
        AptDriver(s).refresh()


def test_a_held_package_is_never_installed(bed: Bed) -> None:
    name = bed.names[0]
    pkg = f"lab-held-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([name], {pkg: "1.0"})
    bed.root(name, "apt-mark", "hold", pkg)
    bed.repo.good(pkg, "1.1")
    with Session(name, bed.addresses[name], settings(bed, bed.known_hosts)) as s:
        driver = AptDriver(s)
        driver.refresh()
        assert [p.package for p in driver.pending()] == []  # apt keeps it back
        with pytest.raises(PackageManagerError) as err:
            driver.install({pkg: "1.1"})
    assert f"held packages (apt-mark hold) are part of the update: {pkg}" in str(err.value)
    assert bed.installed(name, pkg) == "1.0"


def test_the_dpkg_lock_is_waited_for_then_refused(bed: Bed) -> None:
    name = bed.names[0]
    pkg = f"lab-lock-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([name], {pkg: "1.0"})
    bed.repo.good(pkg, "1.1")
    hold = (
        "import fcntl, time\n"
        "f = open('/var/lib/dpkg/lock-frontend', 'w')\n"
        "fcntl.lockf(f, fcntl.LOCK_EX)\n"
        "time.sleep(120)\n"
    )
    bed.root(name, "systemd-run", "--unit", "lab-lock", "python3", "-c", hold)
    try:
        time.sleep(1)
        with Session(name, bed.addresses[name], settings(bed, bed.known_hosts)) as s:
            driver = AptDriver(s, lock_timeout=3)
            driver.refresh()
            started = time.monotonic()
            with pytest.raises(PackageManagerError) as err:
                driver.install({pkg: "1.1"})
            assert time.monotonic() - started >= 3
        assert "lock is still held after 3s" in str(err.value)
        assert "nothing was changed" in str(err.value)
        assert bed.installed(name, pkg) == "1.0"
    finally:
        bed.root(name, "systemctl", "stop", "lab-lock", check=False)


def test_the_key_can_come_from_a_systemd_credential(
    bed: Bed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = bed.names[0]
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "machines-key").write_bytes(bed.key.read_bytes())
    base = {"user": "root", "known_hosts": str(bed.known_hosts), "connect_timeout": "10s"}
    model = SshModel.model_validate({**base, "identity_credential": "machines-key"})
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(AuthFailed, match=r"\$CREDENTIALS_DIRECTORY is not set"):
        Session(name, bed.addresses[name], model).open()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with Session(name, bed.addresses[name], model) as s:
        assert s.run(["id", "-un"]).stdout.strip() == "root"
