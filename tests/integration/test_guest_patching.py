"""Patching Debian machines with the ssh backend, driven by the real engine (run_group),
on the lab's machines and apt repository: exact pending sets, a good update, a failing
postinst and a broken service (both downgraded back), a reboot, staged promotion."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd.backends.ssh import SSHBackend, SSHSelect
from patchd.config.schema import HealthModel, SnapshotModel
from patchd.config.settings import Group
from patchd.config.types import Limit
from patchd.engine import NullObserver, RunRequest, RunResult, run_group, stage_gate
from patchd.guest.apt import AptDriver
from patchd.guest.packages import Pending, identity
from patchd.guest.ssh import Session
from patchd.state import SqliteStore, Store
from tests.integration.guest_bed import HEALTH_TIMEOUT, Bed, bed, machines

__all__ = ["bed", "machines"]  # fixtures

_runs = itertools.count()


def group(name: str, machine_names: list[str], after: str | None = None) -> Group:
    return Group(
        name=name,
        backend="machines",
        window="w",
        select=SSHSelect(names=machine_names),
        after=after,
        soak=timedelta(0),
        max_concurrency=Limit(count=2),
        max_errors=Limit(count=5),
        snapshot=SnapshotModel(),
        health=HealthModel(timeout=HEALTH_TIMEOUT),
    )


def run(
    backend: SSHBackend, store: Store, grp: Group, pins: dict[str, str] | None = None
) -> RunResult:
    return run_group(
        RunRequest(
            run_id=f"guest{next(_runs)}",
            group=grp,
            backend=backend,
            store=store,
            clock=lambda: datetime.now(UTC),
            may_start=lambda now: True,
            observer=NullObserver(),
            pins=pins or {},
            sleep=lambda s: None,
        )
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return SqliteStore(tmp_path / "state.db")


def test_pending_updates_are_listed_exactly(bed: Bed) -> None:
    name = bed.names[-1]
    t = bed.token()
    app, sec, other = f"lab-app-{t}", f"lab-sec-{t}", f"lab-other-{t}"
    bed.repo.good(app, "1.0")
    bed.repo.security(sec, "1.0")
    bed.install([name], {app: "1.0", sec: "1.0"})
    bed.repo.good(app, "1.1")
    bed.repo.security(sec, "1.1")
    bed.repo.good(other, "2.0")  # not installed: not an update of this machine
    backend = bed.backend([name])
    with Session(name, bed.addresses[name], backend.config.ssh) as session:
        driver = AptDriver(session)
        driver.refresh()
        assert driver.pending() == [
            Pending(app, "1.0", "1.1", False, "Debian:bookworm"),
            Pending(sec, "1.0", "1.1", True, "Debian-Security:bookworm-security"),
        ]
    [target] = backend.discover(SSHSelect())
    update = backend.check_update(target, {}, group("g", [name]).patch)
    assert update is not None
    assert update.ref == "packages:apt"
    assert update.current == identity({app: "1.0", sec: "1.0"})
    assert update.available == identity({app: "1.1", sec: "1.1"})
    assert backend.ledger.get(update.available) == {app: "1.1", sec: "1.1"}
    assert bed.installed(name, app) == "1.0"  # a check installs nothing


def test_a_good_update_is_installed(bed: Bed, store: Store) -> None:
    name = bed.names[-1]
    pkg = f"lab-good-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([name], {pkg: "1.0"})
    bed.repo.good(pkg, "1.1")
    result = run(bed.backend([name]), store, group("g", [name]))
    [outcome] = result.outcomes
    assert outcome.result == "success", outcome.error
    assert bed.installed(name, pkg) == "1.1"
    assert bed.state(name) == "running"
    assert result.verified == {"packages:apt": identity({pkg: "1.1"})}


def test_a_failing_postinst_is_downgraded_back(bed: Bed, store: Store) -> None:
    name = bed.names[-1]
    pkg = f"lab-post-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([name], {pkg: "1.0"})
    bed.repo.failing_postinst(pkg, "1.1")
    [outcome] = run(bed.backend([name]), store, group("g", [name])).outcomes
    assert outcome.result == "rolled_back"
    assert outcome.error is not None
    assert outcome.error.startswith("applying:")
    assert f"dpkg: error processing package {pkg} (--configure)" in outcome.error
    assert "post-installation script" in outcome.error
    assert bed.installed(name, pkg) == "1.0"
    assert bed.audit(name) == ""  # nothing half-configured is left
    assert bed.wait_running(name) == "running"


def test_a_broken_service_fails_verify_and_is_downgraded_back(bed: Bed, store: Store) -> None:
    name = bed.names[-1]
    pkg = f"lab-svc-{bed.token()}"
    bed.repo.service(pkg, "1.0")
    bed.install([name], {pkg: "1.0"})
    bed.repo.service(pkg, "1.1", healthy=False)
    [outcome] = run(bed.backend([name]), store, group("g", [name])).outcomes
    assert outcome.result == "rolled_back"
    assert outcome.error is not None
    assert outcome.error.startswith("verifying:")
    assert "is-system-running says degraded" in outcome.error
    assert f"failed units: {pkg}.service" in outcome.error
    assert bed.installed(name, pkg) == "1.0"
    assert bed.wait_running(name) == "running"
    assert bed.root(name, "systemctl", "is-active", f"{pkg}.service").stdout.strip() == "active"


def test_an_update_that_needs_a_reboot_reboots_the_machine(bed: Bed, store: Store) -> None:
    name = bed.names[-1]
    pkg = f"lab-kernel-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([name], {pkg: "1.0"})
    bed.repo.needing_reboot(pkg, "1.1")
    before = bed.boot_id(name)
    [outcome] = run(bed.backend([name]), store, group("g", [name])).outcomes
    assert outcome.result == "success", outcome.error
    bed.wait_root(name)
    assert bed.boot_id(name) != before
    assert bed.installed(name, pkg) == "1.1"
    assert bed.wait_running(name) == "running"
    assert bed.root(name, "test", "-e", "/var/run/reboot-required", check=False).returncode == 1


def test_production_installs_what_staging_verified(bed: Bed, store: Store) -> None:
    staging_host, prod_host = bed.names[-2], bed.names[-1]
    pkg = f"lab-stage-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([staging_host, prod_host], {pkg: "1.0"})
    bed.repo.good(pkg, "1.1")
    staging, production = group("staging", [staging_host]), group("prod", [prod_host], "staging")
    backend = bed.backend([staging_host, prod_host])
    first = run(backend, store, staging)
    assert [o.result for o in first.outcomes] == ["success"]
    bed.repo.good(pkg, "1.2")  # the repository moves on after staging verified 1.1
    gate = stage_gate(production, store, datetime.now(UTC))
    assert gate.open, gate.reason
    assert gate.pins == {"packages:apt": identity({pkg: "1.1"})}
    # A fresh backend, as after a restart between the stages: the pin resolves through
    # the ledger, not through this backend's memory of staging's check.
    [outcome] = run(bed.backend([staging_host, prod_host]), store, production, gate.pins).outcomes
    assert outcome.result == "success", outcome.error
    assert bed.installed(prod_host, pkg) == "1.1"
    assert bed.installed(staging_host, pkg) == "1.1"
