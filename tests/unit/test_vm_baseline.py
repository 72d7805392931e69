"""Baselines on vSphere VMs patched with `patch.method = "apt"`, without a vCenter or a
machine: the config accepts them there and refuses them on ESXi host groups and
"command" groups (naming the key path, with a hint); a VM's assessment goes through
the same package patcher and baseline decision as an ssh machine's, and so reach the
engine, `plan` and `compliance`. The VM's vCenter reads and its guest's package manager
are answered from values (tests/unit/test_baseline's `_Machine`); the real thing is
tests/integration/test_vsphere_guest.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from patchd import compliance, reports
from patchd.backends.base import Target
from patchd.backends.vsphere import VSphereBackend
from patchd.backends.vsphere.vms import VmState
from patchd.config import ConfigError, Settings, load_settings
from patchd.config.baselines import BaselineModel
from patchd.config.schema import PatchModel
from patchd.engine.packages import FIRST_SEEN
from patchd.engine.target import NullObserver, TargetContext, find_update
from patchd.guest.packages import Pending, identity
from patchd.metrics.collectors import GroupCollector
from patchd.state import open_store
from tests.conftest import write_config
from tests.unit.test_baseline import PENDING, T0, Journal, _Machine

VM = Target(id="vm-42", name="web1", kind="vm")
HOST = Target(id="host-7", name="esx1", kind="host")
APT = PatchModel(method="apt")
CAREFUL = {"security_only": True, "exclude": ["openssl"]}


def _config(tmp_path: Path, groups: dict[str, dict[str, Any]]) -> Path:
    key = tmp_path / "id"
    key.write_text("key")
    key.chmod(0o600)
    password = tmp_path / "pw"
    password.write_text("pass\n")
    password.chmod(0o600)
    vc = {
        "type": "vsphere",
        "host": "vc.example",
        "username": "u",
        "password_file": password,
        "guest": {"ssh": {"identity_file": key}},
    }
    return write_config(
        tmp_path / "patchd.toml",
        {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"w": {"days": ["sat"], "duration": "4h"}},
            "backends": {"vc": vc},
            "baselines": {"careful": CAREFUL},
            "groups": {
                name: {"backend": "vc", "window": "w", "baseline": "careful", **group}
                for name, group in groups.items()
            },
        },
    )


def _vms(tmp_path: Path) -> Settings:
    return load_settings(
        _config(tmp_path, {"vms": {"select": {"folder": "/DC0/vm"}, "patch": {"method": "apt"}}})
    )


def test_a_vm_group_patched_with_apt_takes_a_baseline(tmp_path: Path) -> None:
    settings = _vms(tmp_path)
    group = settings.groups["vms"]
    assert group.baseline == BaselineModel.model_validate(CAREFUL)
    assert group.baseline_name == "careful"
    # compliance checks it; its overdue-security setting is exported for the alert rule.
    assert compliance.package_groups(settings, ["vms"]) == ["vms"]
    registry = CollectorRegistry()
    registry.register(GroupCollector(lambda: settings))
    assert (
        'patchd_group_security_max_age_seconds{backend="vc",group="vms"} 1.2096e+06'
        in generate_latest(registry).decode()
    )


@pytest.mark.parametrize(
    ("group", "fix"),
    [
        (
            {"select": {"folder": "/DC0/vm"}, "patch": {"command": ["/usr/local/bin/up"]}},
            'filter; set patch.method = "apt" or "dnf" (VMs with a guest table) or remove it',
        ),
        (
            {"select": {"kind": "host", "folder": "/DC0/host"}},
            "filter; ESXi hosts (select.kind = 'host') have no package list: remove the baseline",
        ),
    ],
    ids=["vm-command", "esxi-hosts"],
)
def test_a_group_that_installs_no_packages_refuses_a_baseline(
    tmp_path: Path, group: dict[str, Any], fix: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_config(tmp_path, {"g": group}))
    text = str(err.value)
    assert (
        "groups.g.baseline: only used where patchd installs packages itself: a backend of"
        " type ssh, or patch.method = 'apt' or 'dnf' (vSphere VMs); backend 'vc' is 'vsphere' and"
        " this group patches with method 'command'" in text
    )
    assert fix in text


def _backend(tmp_path: Path, machine: _Machine) -> VSphereBackend:
    """A vSphere backend whose VM reads and guest sessions are answered from values."""
    key = tmp_path / "id"
    key.write_text("key")
    key.chmod(0o600)
    password = tmp_path / "pw"
    password.write_text("pass\n")
    password.chmod(0o600)
    config = {"host": "vc.example", "username": "u", "password_file": str(password)}
    backend = VSphereBackend("vc", {**config, "guest": {"ssh": {"identity_file": str(key)}}})
    on = VmState(
        "vm-42", None, "web1", "poweredOn", "guestToolsRunning", "green", "192.0.2.4", "", "u", None
    )
    backend.vms.read = lambda moid: on  # type: ignore[method-assign]
    guestos = backend.vms.guestos
    assert guestos is not None
    patcher = guestos.patchers["apt"]
    patcher.connect = lambda target: machine  # type: ignore[assignment,return-value]
    patcher.driver = lambda session: machine  # type: ignore[method-assign]
    return backend


def test_a_vm_is_assessed_under_its_baseline_as_an_ssh_machine_is(tmp_path: Path) -> None:
    backend = _backend(tmp_path, _Machine(PENDING, reboot="/var/run/reboot-required"))
    baseline = BaselineModel.model_validate(CAREFUL)
    found = backend.assess(VM, {}, APT, baseline, Journal(), T0)
    assert found is not None
    assert found.versions == {"libssl3": "3.0.15"}  # security only, openssl excluded
    held = {h.update.package: h.kind for h in found.decision.held}
    assert held == {
        "openssl": "excluded",
        "linux-image-amd64": "not security",
        "tzdata": "not security",
    }
    assert found.update is not None and found.update.ref == "packages:apt"
    assert found.update.available == identity({"libssl3": "3.0.15"})
    assert found.reboot_required == "/var/run/reboot-required"
    # The run installs that set, with the baseline's reboot policy.
    assert backend.vms.guestos is not None
    plan = backend.vms.guestos.patchers["apt"].plan(VM, found.update.available)
    assert plan.versions == {"libssl3": "3.0.15"} and plan.baseline == baseline
    # ESXi hosts and "command" groups are not patched package by package.
    assert backend.assess(HOST, {}, APT, baseline, Journal(), T0) is None
    assert backend.assess(VM, {}, PatchModel(), baseline, Journal(), T0) is None


def test_a_powered_off_vm_is_refused_before_its_guest_is_asked(tmp_path: Path) -> None:
    from patchd.backends.base import NotRunning

    backend = _backend(tmp_path, _Machine(PENDING))
    off = VmState("vm-42", None, "web1", "poweredOff", None, None, "", "", "u", None)
    backend.vms.read = lambda moid: off  # type: ignore[method-assign]
    with pytest.raises(NotRunning, match="web1 is poweredOff"):
        backend.assess(VM, {}, APT, None, Journal(), T0)


def test_the_engine_plan_and_compliance_see_what_a_vm_baseline_holds(tmp_path: Path) -> None:
    settings = _vms(tmp_path)
    group = settings.groups["vms"]
    store = open_store(tmp_path / "state.db")
    # Everything pending held back: the engine skips the VM and names the baseline.
    only_other = [p for p in PENDING if not p.security]
    backend = _backend(tmp_path, _Machine(only_other))
    ctx = TargetContext("r1", group, backend, store, lambda: T0, NullObserver(), {})
    update, reason = find_update(ctx, VM)
    assert update is None
    assert reason is not None and reason.startswith(
        "baseline 'careful' holds back 2 update(s): linux-image-amd64 6.1.119: not a"
        " security update"
    )
    # With a security update: plan lists the exact version and each held-back reason.
    backend = _backend(tmp_path, _Machine(PENDING))
    backend.discover = lambda select: [VM]  # type: ignore[method-assign]
    doc = reports.plan(settings, store, {"vc": backend}, "vms", T0)
    [entry] = doc["targets"]
    assert entry["action"] == "patch" and entry["ref"] == "packages:apt"
    assert entry["packages"] == [
        {"package": "libssl3", "installed": "3.0.11", "version": "3.0.15", "security": True}
    ]
    text = reports.render_plan(doc)
    assert "      held: openssl 3.0.15: excluded by the baseline (openssl)" in text
    # compliance: the same, per VM, recorded for the metrics.
    [checked] = compliance.check(settings, store, lambda name: backend, ["vms"], T0)
    assert checked["target"] == "web1" and checked["error"] is None
    assert checked["pending"] == {"security": 2, "other": 2} and checked["held"] == 3
    reasons = {u["package"]: u["held"] for u in checked["updates"]}
    assert reasons["openssl"] == "excluded" and reasons["libssl3"] is None
    assert [c.target for c in compliance.compliance(store, "vms")] == ["web1"]
    assert store.controls(FIRST_SEEN, "")  # approve_after counts from these sightings


def test_production_vms_get_what_staging_verified_less_what_their_baseline_holds(
    tmp_path: Path,
) -> None:
    machine = _Machine(PENDING)
    backend = _backend(tmp_path, machine)
    staging = backend.assess(VM, {}, APT, None, Journal(), T0)
    assert staging is not None and staging.update is not None and len(staging.versions) == 4
    # The repository moves on; production pins staging's set, under a baseline that
    # excludes one package and waits 7 days for versions it first saw just now.
    machine.pending_now = [*PENDING[:3], Pending("tzdata", "2024a", "2025a", False, "D")]
    pins = {"packages:apt": staging.update.available}
    baseline = BaselineModel(exclude=["linux-image-*"])
    prod = backend.assess(VM, pins, APT, baseline, Journal(), T0)
    assert prod is not None and prod.update is not None
    assert prod.versions == {"libssl3": "3.0.15", "openssl": "3.0.15", "tzdata": "2024b"}
    assert prod.update.available == staging.update.available  # named by staging's set
    waiting = BaselineModel(approve_after=timedelta(days=7))
    held = backend.assess(VM, pins, APT, waiting, Journal(), T0)
    assert held is not None and held.update is None
    assert {h.kind for h in held.decision.held} == {"approve_after"}
    assert {h.until for h in held.decision.held} == {T0 + timedelta(days=7)}
