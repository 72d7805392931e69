"""vSphere VMs patched with `patch.method = "dnf"`: vcsim VMs whose guest IP is one of the
lab's rpm machines (Debian's real dnf and rpm, tests/lab/rpmlab.py), so the VM flow drives
a real dnf over SSH between its vSphere snapshot and the commit or revert, through the real
engine. As with apt (test_vsphere_guest.py), vcsim's revert cannot reach the machine
behind the VM: the tests check that the revert was issued and the reason given."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from patchd.config.schema import PatchModel
from patchd.config.settings import Group
from patchd.guest.packages import identity
from patchd.state import Store
from tests.integration.rpm_bed import RpmBed, rpm_bed, rpm_machines
from tests.integration.test_vsphere_guest import backend, group, point, reverted, run, sim, store
from tests.integration.vsphere_lab import Sim

__all__ = ["rpm_bed", "rpm_machines", "sim", "store"]  # fixtures


def dnf_group(name: str, vms: list[str]) -> Group:
    return dataclasses.replace(group(name, vms), patch=PatchModel(method="dnf"))


def test_a_vm_is_patched_with_dnf_and_a_failing_post_reverts_it(
    sim: Sim, rpm_bed: RpmBed, store: Store, tmp_path: Path
) -> None:
    vm_good, vm_post = list(sim.vms())[:2]
    m_good, m_post = rpm_bed.names[:2]
    point(sim, rpm_bed, {vm_good: m_good, vm_post: m_post})
    t = rpm_bed.token()
    good, post = f"lab-vmgood-{t}", f"lab-vmpost-{t}"
    rpm_bed.rpm.good(good, "1.0")
    rpm_bed.rpm.good(post, "1.0")
    rpm_bed.install([m_good], {good: "1.0-1"})
    rpm_bed.install([m_post], {post: "1.0-1"})
    rpm_bed.rpm.good(good, "1.1")
    rpm_bed.rpm.failing_post(post, "1.1")
    vc = backend(sim, rpm_bed, tmp_path)
    try:
        result = run(vc, store, dnf_group("g", [vm_good, vm_post]))
    finally:
        vc.close()
    outcomes = {o.target.name: o for o in result.outcomes}
    assert outcomes[vm_good].result == "success", outcomes[vm_good].error
    assert rpm_bed.installed(m_good, good) == "1.1-1"
    assert result.verified == {"packages:dnf": identity({good: "1.1-1"})}
    assert sim.snapshots(vm_good) == []  # committed: the snapshot is removed
    assert outcomes[vm_post].result == "rolled_back", outcomes[vm_post].error
    assert outcomes[vm_post].error == (
        f"applying: {vm_post}: installing {post}=1.1-1: Error in POSTIN scriptlet in rpm"
        f" package {post}"
    )
    assert reverted(sim, store, result, vm_post)["recorded"] == {post: "1.0-1"}
    # vcsim's revert cannot reach the machine behind the VM (a real revert restores the
    # disk): the new version stays there; the cleanup removes it.
    assert rpm_bed.installed(m_post, post) == "1.1-1"
