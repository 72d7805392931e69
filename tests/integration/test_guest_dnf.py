"""Patching with dnf through the ssh backend, driven by the real engine (run_group) and the
`patchd` command, on the lab's rpm machines: Debian's real dnf 4.14 and rpm 4.18 with an
rpm database and a local rpm repository (tests/lab/rpmlab.py). Exact pending sets with
security advisories (plan, compliance, a security-only run), a good update (through
sudo), a failing %post, a new dependency and a broken service (downgraded back), a reboot
asked for by `dnf needs-restarting -r`, a held lock and a versionlock refused, and
production installing the versions staging verified."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from patchd.backends.ssh import SSHSelect
from patchd.engine import stage_gate
from patchd.guest.dnf import DnfDriver
from patchd.guest.errors import PackageManagerError
from patchd.guest.packages import Pending, identity
from patchd.guest.ssh import Session
from patchd.state import Store
from tests.integration.rpm_bed import RpmBed, rpm_bed, rpm_machines
from tests.integration.test_guest_compliance import compliance, config, patchd
from tests.integration.test_guest_patching import group, run, store

__all__ = ["rpm_bed", "rpm_machines", "store"]  # fixtures

# Holds dnf's rpmdb lock as dnf does (its pid in the file, the process alive); see
# docs/dnf-on-debian.md.
_HOLD_LOCK = (
    'python3 -c \'import os,time; open("/var/lib/dnf/rpmdb_lock.pid","w").write('
    "str(os.getpid())); time.sleep(30)' >/dev/null 2>&1 & echo $!"
)


def test_pending_rpm_updates_are_listed_exactly(rpm_bed: RpmBed) -> None:
    name = rpm_bed.names[0]
    t = rpm_bed.token()
    app, sec, other = f"lab-app-{t}", f"lab-sec-{t}", f"lab-other-{t}"
    rpm_bed.rpm.good(app, "1.0")
    rpm_bed.rpm.good(sec, "1.0")
    rpm_bed.install([name], {app: "1.0-1", sec: "1.0-1"})
    rpm_bed.rpm.good(app, "1.1")
    rpm_bed.rpm.security(sec, "1.1")
    rpm_bed.rpm.good(other, "2.0")  # not installed: not an update of this machine
    backend = rpm_bed.backend([name])
    with Session(name, rpm_bed.addresses[name], backend.config.ssh) as session:
        driver = DnfDriver(session)
        driver.refresh()
        assert driver.pending() == [
            Pending(app, "1.0-1", "1.1-1", False, "lab"),
            Pending(sec, "1.0-1", "1.1-1", True, f"lab (LAB-SA-{sec}-1.1)"),
        ]
    [target] = backend.discover(SSHSelect())
    update = backend.check_update(target, {}, group("g", [name]).patch)
    assert update is not None
    assert update.ref == "packages:dnf"
    assert update.current == identity({app: "1.0-1", sec: "1.0-1"})
    assert backend.ledger.get(update.available) == {app: "1.1-1", sec: "1.1-1"}
    assert update.available == identity({app: "1.1-1", sec: "1.1-1"})
    assert backend.ledger.get(update.available) == {app: "1.1-1", sec: "1.1-1"}
    assert rpm_bed.installed(name, app) == "1.0-1"  # a check installs nothing


def test_plan_and_compliance_list_the_exact_pending_rpms(rpm_bed: RpmBed, tmp_path: Path) -> None:
    name = rpm_bed.names[0]
    t = rpm_bed.token()
    app, sec = f"lab-app-{t}", f"lab-sec-{t}"
    rpm_bed.rpm.good(app, "1.0")
    rpm_bed.rpm.good(sec, "1.0")
    rpm_bed.install([name], {app: "1.0-1", sec: "1.0-1"})
    rpm_bed.rpm.good(app, "1.1")
    rpm_bed.rpm.security(sec, "1.1")
    path = config(tmp_path, rpm_bed, [name], {}, package_manager="dnf")
    proc = patchd(path, "plan", "--json")
    assert proc.returncode == 0, proc.stderr
    [target] = json.loads(proc.stdout)["groups"][0]["targets"]
    assert target["action"] == "patch"
    assert target["packages"] == [
        {"package": app, "installed": "1.0-1", "version": "1.1-1", "security": False},
        {"package": sec, "installed": "1.0-1", "version": "1.1-1", "security": True},
    ]
    text = patchd(path, "plan").stdout
    assert f"      {sec} 1.0-1 -> 1.1-1 (security)\n" in text
    status, doc = compliance(path)
    assert (status, doc["pending"]) == (1, {"security": 1, "other": 1}), doc
    assert rpm_bed.installed(name, app) == "1.0-1"  # neither installs anything


def test_a_security_only_run_installs_the_advisory_and_compliance_ends_at_zero(
    rpm_bed: RpmBed, tmp_path: Path
) -> None:
    name = rpm_bed.names[0]
    t = rpm_bed.token()
    app, sec = f"lab-app-{t}", f"lab-sec-{t}"
    rpm_bed.rpm.good(app, "1.0")
    rpm_bed.rpm.good(sec, "1.0")
    rpm_bed.install([name], {app: "1.0-1", sec: "1.0-1"})
    rpm_bed.rpm.good(app, "1.1")
    rpm_bed.rpm.security(sec, "1.1")
    baselines = {"sec": {"security_only": True}}
    path = config(tmp_path, rpm_bed, [name], baselines, package_manager="dnf", baseline="sec")
    run = patchd(path, "run", "os", "--now")
    assert run.returncode == 0, run.stdout + run.stderr
    assert rpm_bed.installed(name, sec) == "1.1-1"
    assert rpm_bed.installed(name, app) == "1.0-1"  # not a security update: left alone
    code, doc = compliance(path)
    assert (code, doc["pending"]) == (0, {"security": 0, "other": 1}), doc
    [left] = doc["updates"]
    assert (left["package"], left["held"]) == (app, "not security")


def test_a_good_rpm_update_is_installed(rpm_bed: RpmBed, store: Store) -> None:
    name = rpm_bed.names[0]
    pkg = f"lab-good-{rpm_bed.token()}"
    rpm_bed.rpm.good(pkg, "1.0")
    rpm_bed.install([name], {pkg: "1.0-1"})
    rpm_bed.rpm.good(pkg, "1.1")
    # As a user with sudo rights (NOPASSWD in the image): every dnf runs under `sudo -n`.
    backend = rpm_bed.backend([name], user="patchd", sudo=True)
    result = run(backend, store, group("g", [name]))
    [outcome] = result.outcomes
    assert outcome.result == "success", outcome.error
    assert rpm_bed.installed(name, pkg) == "1.1-1"
    assert rpm_bed.state(name) == "running"
    assert result.verified == {"packages:dnf": identity({pkg: "1.1-1"})}


def test_a_failing_post_scriptlet_is_downgraded_back(rpm_bed: RpmBed, store: Store) -> None:
    name = rpm_bed.names[0]
    pkg = f"lab-post-{rpm_bed.token()}"
    rpm_bed.rpm.good(pkg, "1.0")
    rpm_bed.install([name], {pkg: "1.0-1"})
    rpm_bed.rpm.failing_post(pkg, "1.1")
    [outcome] = run(rpm_bed.backend([name]), store, group("g", [name])).outcomes
    assert outcome.result == "rolled_back", outcome.error
    # dnf -q drops rpm's "warning: %post(...) scriptlet failed" line; this one stays.
    assert outcome.error == (
        f"applying: {name}: installing {pkg}=1.1-1: Error in POSTIN scriptlet in rpm package {pkg}"
    )
    assert rpm_bed.installed(name, pkg) == "1.0-1"
    assert rpm_bed.wait_running(name) == "running"


def test_a_new_dependency_is_pending_installed_and_removed_again_by_the_rollback(
    rpm_bed: RpmBed, store: Store
) -> None:
    name = rpm_bed.names[0]
    t = rpm_bed.token()
    app, dep = f"lab-needs-{t}", f"lab-dep-{t}"
    rpm_bed.rpm.good(app, "1.0")
    rpm_bed.install([name], {app: "1.0-1"})
    rpm_bed.rpm.good(dep, "1.0")  # not installed, and nothing needs it yet
    rpm_bed.rpm.failing_post(app, "1.1", requires=f"{dep} >= 1.0")
    backend = rpm_bed.backend([name])
    with Session(name, rpm_bed.addresses[name], backend.config.ssh) as session:
        driver = DnfDriver(session)
        driver.refresh()
        assert driver.pending() == [
            Pending(dep, None, "1.0-1", False, "lab"),
            Pending(app, "1.0-1", "1.1-1", False, "lab"),
        ]
    [outcome] = run(backend, store, group("g", [name])).outcomes
    assert outcome.result == "rolled_back", outcome.error
    assert outcome.error is not None and "Error in POSTIN scriptlet" in outcome.error
    assert rpm_bed.installed(name, app) == "1.0-1"
    assert rpm_bed.installed(name, dep) is None  # new with the update: removed again


def test_a_broken_service_fails_verify_and_is_downgraded_back(
    rpm_bed: RpmBed, store: Store
) -> None:
    name = rpm_bed.names[0]
    pkg = f"lab-svc-{rpm_bed.token()}"
    rpm_bed.rpm.service(pkg, "1.0")
    rpm_bed.install([name], {pkg: "1.0-1"})
    rpm_bed.rpm.service(pkg, "1.1", healthy=False)
    [outcome] = run(rpm_bed.backend([name]), store, group("g", [name])).outcomes
    assert outcome.result == "rolled_back", outcome.error
    assert outcome.error is not None
    assert outcome.error.startswith("verifying:")
    assert "is-system-running says degraded" in outcome.error
    assert f"failed units: {pkg}.service" in outcome.error
    assert rpm_bed.installed(name, pkg) == "1.0-1"
    assert rpm_bed.wait_running(name) == "running"
    assert rpm_bed.root(name, "systemctl", "is-active", f"{pkg}.service").stdout.strip() == "active"


def test_an_rpm_that_needs_a_reboot_reboots_the_machine(rpm_bed: RpmBed, store: Store) -> None:
    name = rpm_bed.names[0]
    pkg = f"lab-kernel-{rpm_bed.token()}"
    rpm_bed.rpm.good(pkg, "1.0")
    rpm_bed.install([name], {pkg: "1.0-1"})
    rpm_bed.rpm.needing_reboot(pkg, "1.1")
    before = rpm_bed.boot_id(name)
    [outcome] = run(rpm_bed.backend([name]), store, group("g", [name])).outcomes
    assert outcome.result == "success", outcome.error
    rpm_bed.wait_root(name)
    assert rpm_bed.boot_id(name) != before
    assert rpm_bed.installed(name, pkg) == "1.1-1"
    assert rpm_bed.wait_running(name) == "running"
    again = rpm_bed.root(name, "dnf", "-q", "--disablerepo=*", "needs-restarting", "-r")
    assert "Reboot should not be necessary" in again.stdout


def test_a_held_lock_and_a_versionlock_are_refused(rpm_bed: RpmBed) -> None:
    name = rpm_bed.names[0]
    pkg = f"lab-lock-{rpm_bed.token()}"
    rpm_bed.rpm.good(pkg, "1.0")
    rpm_bed.install([name], {pkg: "1.0-1"})
    rpm_bed.rpm.good(pkg, "1.1")
    backend = rpm_bed.backend([name])
    with Session(name, rpm_bed.addresses[name], backend.config.ssh) as session:
        driver = DnfDriver(session, lock_timeout=4)
        driver.refresh()  # as a run does before it installs
        holder = rpm_bed.root(name, "sh", "-c", _HOLD_LOCK).stdout.strip()
        try:
            with pytest.raises(PackageManagerError) as err:
                driver.install({pkg: "1.1-1"})
            assert "the package manager's lock is still held after 4s (RPMDB already locked" in (
                str(err.value)
            )
        finally:
            rpm_bed.root(name, "sh", "-c", f"kill {holder}; rm -f /var/lib/dnf/rpmdb_lock.pid")
        assert rpm_bed.installed(name, pkg) == "1.0-1"
        rpm_bed.root(name, "dnf", "-q", "versionlock", "add", pkg)
        with pytest.raises(PackageManagerError, match=f"versionlocked packages .*: {pkg};"):
            driver.install({pkg: "1.1-1"})
    assert rpm_bed.installed(name, pkg) == "1.0-1"


def test_production_installs_the_rpm_versions_staging_verified(
    rpm_bed: RpmBed, store: Store
) -> None:
    staging_host, prod_host = rpm_bed.names[0], rpm_bed.names[1]
    pkg = f"lab-stage-{rpm_bed.token()}"
    rpm_bed.rpm.good(pkg, "1.0")
    rpm_bed.install([staging_host, prod_host], {pkg: "1.0-1"})
    rpm_bed.rpm.good(pkg, "1.1")
    staging, production = group("staging", [staging_host]), group("prod", [prod_host], "staging")
    first = run(rpm_bed.backend([staging_host, prod_host]), store, staging)
    assert [o.result for o in first.outcomes] == ["success"]
    rpm_bed.rpm.good(pkg, "1.2")  # the repository moves on after staging verified 1.1
    gate = stage_gate(production, store, datetime.now(UTC))
    assert gate.open, gate.reason
    assert gate.pins == {"packages:dnf": identity({pkg: "1.1-1"})}
    # A fresh backend, as after a restart: the pin resolves through the ledger.
    backend = rpm_bed.backend([staging_host, prod_host])
    [outcome] = run(backend, store, production, gate.pins).outcomes
    assert outcome.result == "success", outcome.error
    assert rpm_bed.installed(prod_host, pkg) == "1.1-1"  # not 1.2, the newest
    assert rpm_bed.installed(staging_host, pkg) == "1.1-1"
