"""vSphere VMs patched with `patch.method = "apt"`: vcsim VMs whose guest IP (extraConfig
`SET.guest.ipAddress`) is a lab machine's address, so the VM flow drives a real apt over
SSH between its vSphere snapshot and the commit or revert, through the real engine.

What vcsim cannot show: its revert does not touch the machine behind the VM (the
"guest" is a separate container), so a failed update stays installed on the machine even
though the VM was reverted. These tests assert what is true here: the revert was issued
on the snapshot patchd took (SOAP trace), the snapshot is gone, and the outcome says
rolled back with the reason. On a real vCenter the revert puts the disk back.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.backends.vsphere import VSphereBackend, VSphereSelect
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel
from patchd.config.settings import Group
from patchd.config.types import Limit
from patchd.engine import NullObserver, RunRequest, RunResult, run_group, stage_gate
from patchd.engine.packages import compliance
from patchd.guest.packages import identity
from patchd.metrics.journal import compliance_families
from patchd.state import SqliteStore, Store
from tests.conftest import write_config
from tests.integration.conftest import VcsimProcess
from tests.integration.daemon_helpers import run_patchd
from tests.integration.guest_bed import HEALTH_TIMEOUT, Bed, bed, machines
from tests.integration.vsphere_lab import Sim, start

__all__ = ["bed", "machines"]  # fixtures

_runs = itertools.count()


@pytest.fixture
def sim(vcsim_factory: Callable[..., VcsimProcess], tmp_path: Path) -> Iterator[Sim]:
    made = start(vcsim_factory, tmp_path, vms=2, trace=True)
    yield made
    made.close()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return SqliteStore(tmp_path / "state.db")


def point(sim: Sim, bed: Bed, pairs: dict[str, str]) -> None:
    """VM name -> machine name: Tools running, green, with the machine's address."""
    for vm, machine in pairs.items():
        sim.set_tools(vm, ip=bed.addresses[machine])


def backend(sim: Sim, bed: Bed, tmp_path: Path) -> VSphereBackend:
    ssh = {"user": "root", "identity_file": str(bed.key), "known_hosts": str(bed.known_hosts)}
    guest = {"ssh": ssh, "lock_timeout": "20s", "reboot_timeout": "120s"}
    return sim.backend(tmp_path, guest=guest)


def group(name: str, vms: list[str], after: str | None = None) -> Group:
    return Group(
        name=name,
        backend="vc",
        window="w",
        select=VSphereSelect(names=vms),
        after=after,
        soak=timedelta(0),
        max_concurrency=Limit(count=2),
        max_errors=Limit(count=5),
        snapshot=SnapshotModel(),
        health=HealthModel(timeout=HEALTH_TIMEOUT, stable_for="0s"),
        patch=PatchModel(method="apt"),
    )


def run(
    vc: VSphereBackend, store: Store, grp: Group, pins: dict[str, str] | None = None
) -> RunResult:
    return run_group(
        RunRequest(
            run_id=f"vmapt{next(_runs)}",
            group=grp,
            backend=vc,
            store=store,
            clock=lambda: datetime.now(UTC),
            may_start=lambda now: True,
            observer=NullObserver(),
            pins=pins or {},
            sleep=lambda s: None,
        )
    )


def reverted(sim: Sim, store: Store, result: RunResult, vm: str) -> dict[str, Any]:
    """The journal's snapshot of a rolled-back VM, after checking the revert in the trace."""
    row = next(r for r in store.targets(result.run_id) if r.name == vm)
    assert row.state == "rolled_back"
    assert row.snapshot is not None
    moref = row.snapshot["moref"]
    assert sim.calls("RevertToSnapshot_Task", moref) == 1
    assert sim.calls("RemoveSnapshot_Task", moref) == 1
    assert sim.snapshots(vm) == []
    return dict(row.snapshot)


def test_a_good_update_is_installed_in_the_guest_and_committed(
    sim: Sim, bed: Bed, store: Store, tmp_path: Path
) -> None:
    vm, machine = next(iter(sim.vms())), bed.names[-1]
    point(sim, bed, {vm: machine})
    pkg = f"lab-vmgood-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([machine], {pkg: "1.0"})
    bed.repo.good(pkg, "1.1")
    vc = backend(sim, bed, tmp_path)
    try:
        result = run(vc, store, group("g", [vm]))
    finally:
        vc.close()
    [outcome] = result.outcomes
    assert outcome.result == "success", outcome.error
    assert bed.installed(machine, pkg) == "1.1"
    assert bed.state(machine) == "running"
    assert result.verified == {"packages:apt": identity({pkg: "1.1"})}
    [row] = store.targets(result.run_id)
    assert row.snapshot is not None
    assert row.snapshot["recorded"] == {pkg: "1.0"}  # what the guest was on, journaled
    assert sim.calls("CreateSnapshot_Task", sim.vm(vm)._moId) == 1
    assert sim.snapshots(vm) == []  # committed: the snapshot is removed


def test_a_failing_postinst_or_a_broken_service_reverts_the_vm(
    sim: Sim, bed: Bed, store: Store, tmp_path: Path
) -> None:
    vm_post, vm_svc = list(sim.vms())[:2]
    m_post, m_svc = bed.names[-2], bed.names[-1]
    point(sim, bed, {vm_post: m_post, vm_svc: m_svc})
    t = bed.token()
    post, svc = f"lab-vmpost-{t}", f"lab-vmsvc-{t}"
    bed.repo.good(post, "1.0")
    bed.repo.service(svc, "1.0")
    bed.install([m_post], {post: "1.0"})
    bed.install([m_svc], {svc: "1.0"})
    bed.repo.failing_postinst(post, "1.1")
    bed.repo.service(svc, "1.1", healthy=False)
    vc = backend(sim, bed, tmp_path)
    try:
        result = run(vc, store, group("g", [vm_post, vm_svc]))
    finally:
        vc.close()
    outcomes = {o.target.name: o for o in result.outcomes}
    assert outcomes[vm_post].result == "rolled_back"
    assert (outcomes[vm_post].error or "").startswith("applying:")
    assert f"dpkg: error processing package {post} (--configure)" in str(outcomes[vm_post].error)
    assert outcomes[vm_svc].result == "rolled_back"
    assert (outcomes[vm_svc].error or "").startswith("verifying:")
    assert "is-system-running says degraded" in str(outcomes[vm_svc].error)
    assert f"failed units: {svc}.service" in str(outcomes[vm_svc].error)
    assert reverted(sim, store, result, vm_post)["recorded"] == {post: "1.0"}
    assert reverted(sim, store, result, vm_svc)["recorded"] == {svc: "1.0"}
    # vcsim's revert cannot reach the machine behind the VM: the new version stays there
    # (a real revert restores the disk). Put the machines back for the next tests.
    assert bed.installed(m_svc, svc) == "1.1"
    bed.root(m_post, "dpkg", "--configure", "-a", check=False)
    bed.install([m_post], {post: "1.0"})
    bed.install([m_svc], {svc: "1.0"})
    assert bed.wait_running(m_svc) == "running"


def test_production_vms_install_what_staging_verified(
    sim: Sim, bed: Bed, store: Store, tmp_path: Path
) -> None:
    vm_stage, vm_prod = list(sim.vms())[:2]
    m_stage, m_prod = bed.names[-2], bed.names[-1]
    point(sim, bed, {vm_stage: m_stage, vm_prod: m_prod})
    pkg = f"lab-vmstage-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([m_stage, m_prod], {pkg: "1.0"})
    bed.repo.good(pkg, "1.1")
    staging, production = group("staging", [vm_stage]), group("prod", [vm_prod], "staging")
    vc = backend(sim, bed, tmp_path)
    try:
        first = run(vc, store, staging)
        assert [o.result for o in first.outcomes] == ["success"], first.outcomes
        bed.repo.good(pkg, "1.2")  # the repository moves on after staging verified 1.1
        gate = stage_gate(production, store, datetime.now(UTC))
        assert gate.open, gate.reason
        assert gate.pins == {"packages:apt": identity({pkg: "1.1"})}
        [outcome] = run(vc, store, production, gate.pins).outcomes
    finally:
        vc.close()
    assert outcome.result == "success", outcome.error
    assert bed.installed(m_prod, pkg) == "1.1"


def test_an_update_that_needs_a_reboot_reboots_the_guest_over_ssh(
    sim: Sim, bed: Bed, store: Store, tmp_path: Path
) -> None:
    vm, machine = next(iter(sim.vms())), bed.names[-1]
    point(sim, bed, {vm: machine})
    pkg = f"lab-vmkernel-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([machine], {pkg: "1.0"})
    bed.repo.needing_reboot(pkg, "1.1")
    before = bed.boot_id(machine)
    vc = backend(sim, bed, tmp_path)
    try:
        [outcome] = run(vc, store, group("g", [vm])).outcomes
    finally:
        vc.close()
    assert outcome.result == "success", outcome.error
    bed.wait_root(machine)
    assert bed.boot_id(machine) != before  # rebooted by `systemctl reboot` over SSH
    assert bed.installed(machine, pkg) == "1.1"
    assert bed.wait_running(machine) == "running"
    # Not through vSphere: a guest reboot is the guest's own (vcsim has no RebootGuest).
    assert sim.calls("ResetVM_Task", sim.vm(vm)._moId) == 0


def test_a_vm_baseline_holds_back_an_exclude_and_installs_security_only(
    sim: Sim, bed: Bed, tmp_path: Path
) -> None:
    """A VM group under a baseline, through the `patchd` command: plan and compliance
    name what it holds back and why, and the run installs only what it lets in."""
    vm, machine = next(iter(sim.vms())), bed.names[-1]
    point(sim, bed, {vm: machine})
    t = bed.token()
    app, sec, kept = f"lab-vmapp-{t}", f"lab-vmsec-{t}", f"lab-vmkept-{t}"
    bed.repo.good(app, "1.0")
    bed.repo.security(sec, "1.0")
    bed.repo.security(kept, "1.0")
    bed.install([machine], {app: "1.0", sec: "1.0", kept: "1.0"})
    bed.repo.good(app, "1.1")
    bed.repo.security(sec, "1.1")
    bed.repo.security(kept, "1.1")
    ssh = {"user": "root", "identity_file": bed.key, "known_hosts": bed.known_hosts}
    vc = sim.config(tmp_path, guest={"ssh": ssh, "lock_timeout": "20s", "reboot_timeout": "120s"})
    path = write_config(
        tmp_path / "patchd.toml",
        {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"w": {"days": ["sat"], "duration": "1h"}},
            "backends": {"vc": {"type": "vsphere", **vc}},
            "baselines": {"careful": {"security_only": True, "exclude": [kept]}},
            "groups": {
                "vms": {
                    "backend": "vc",
                    "window": "w",
                    "select": {"names": [vm]},
                    "patch": {"method": "apt"},
                    "baseline": "careful",
                    "health": {"timeout": "40s", "stable_for": "1s"},
                }
            },
        },
    )

    def patchd(*args: str) -> subprocess.CompletedProcess[str]:
        return run_patchd(*args, "-c", str(path))

    shown = patchd("plan", "--json")
    assert shown.returncode == 0, shown.stderr
    [target] = json.loads(shown.stdout)["groups"][0]["targets"]
    assert (target["name"], target["action"], target["ref"]) == (vm, "patch", "packages:apt")
    assert target["packages"] == [
        {"package": sec, "installed": "1.0", "version": "1.1", "security": True}
    ]
    held = {h["package"]: (h["held"], h["reason"]) for h in target["held"]}
    assert held == {
        app: ("not security", "not a security update (Debian:bookworm)"),
        kept: ("excluded", f"excluded by the baseline ({kept})"),
    }
    text = patchd("plan").stdout
    assert f"      {sec} 1.0 -> 1.1 (security)\n" in text
    assert f"      held: {kept} 1.1: excluded by the baseline ({kept})\n" in text

    report = patchd("compliance", "--json")
    assert report.returncode == 1, report.stderr  # a security update it lets in is pending
    [doc] = json.loads(report.stdout)["targets"]
    assert (doc["target"], doc["baseline"]) == (vm, "careful")
    assert doc["pending"] == {"security": 2, "other": 1} and doc["held"] == 2
    assert doc["allowed_security"] == 1

    run = patchd("run", "vms", "--now")
    assert run.returncode == 0, run.stdout + run.stderr
    installed = {p: bed.installed(machine, p) for p in (app, sec, kept)}
    assert installed == {app: "1.0", sec: "1.1", kept: "1.0"}  # the exclude never installed
    assert sim.snapshots(vm) == []  # committed

    report = patchd("compliance", "--json")
    assert report.returncode == 0, report.stdout + report.stderr
    [doc] = json.loads(report.stdout)["targets"]
    assert doc["pending"] == {"security": 1, "other": 1} and doc["allowed_security"] == 0
    left = {u["package"]: u["held"] for u in doc["updates"]}
    assert left == {app: "not security", kept: "excluded"}
    assert doc["last_patched"] is not None
    assert f"{kept} 1.0 -> 1.1 (security)  held: excluded by the baseline ({kept})" in (
        patchd("compliance").stdout
    )
    # The metrics the daemon exports from what compliance recorded, per VM.
    recorded = SqliteStore(tmp_path / "state" / "patchd.db")
    samples = {
        (f.name, tuple(s.labels.values())): s.value
        for f in compliance_families(compliance(recorded, "vms"))
        for s in f.samples
    }
    recorded.close()
    assert samples[("patchd_target_pending_updates", ("vms", vm, "security"))] == 1
    assert samples[("patchd_target_held_updates", ("vms", vm))] == 2
    assert samples[("patchd_target_reboot_required", ("vms", vm))] == 0
