"""vSphere backend (`type = "vsphere"`): patches VMs (snapshot, command, revert) and ESXi hosts.

The plugin class, `VSphereBackend`, routes each call to the VM flow (`vms.py`) or the host
flow (`hosts.py`) by the target's kind; the steps both share (task waits, the update
check, patch.command, the "healthy for stable_for" verify, version records) are
`flow.py`, VM snapshot trees `snapshots.py`. The other modules each own one concern:
`config.py` (the keys), `connection.py` (session, TLS, retries, password), `collector.py`
(property-collector reads, task waits), `inventory.py` (discovery and selectors),
`tags.py` (vSphere tags over REST), `attributes.py` (custom attributes, patchd's own
state on the targets), `command.py` (the patch.command executor) and `steps.py` (error
mapping onto the contract).

Construction does not connect: the session logs in on first use.

VMs patched with `patch.method = "apt"` or `"dnf"` are assessed package by package (`assess`, the
optional AssessesPackages protocol of patchd.guest.assessment), so a group's baseline,
`plan` and `compliance` apply to them as to the ssh backend's machines.

Besides the Backend protocol it offers `patchd_snapshots()` (every patchd snapshot in the
vCenter, oldest first) and `oldest_patchd_snapshot_age(now)` (seconds, or None) for the
metric that shows no patchd snapshot outlives its `snapshot.keep`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from patchd.backends.base import Retained, Snapshot, Target, Update
from patchd.backends.vsphere import inventory
from patchd.backends.vsphere.config import VSphereConfig, VSphereSelect, check_group
from patchd.backends.vsphere.connection import LoginFailed, Session, vmomi
from patchd.backends.vsphere.hosts import HostFlow
from patchd.backends.vsphere.snapshots import PatchdSnapshot
from patchd.backends.vsphere.steps import step
from patchd.backends.vsphere.tags import Tags
from patchd.backends.vsphere.vms import VmFlow
from patchd.config.baselines import PACKAGE_METHODS
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel

if TYPE_CHECKING:
    from patchd.config.baselines import BaselineModel
    from patchd.guest.assessment import Assessment
    from patchd.guest.baseline import FirstSeen

__all__ = [
    "LoginFailed",
    "PatchdSnapshot",
    "VSphereBackend",
    "VSphereConfig",
    "VSphereSelect",
]


class VSphereBackend:
    """The vSphere backend plugin: one `[backends.NAME]` table, one vCenter session."""

    config_model: ClassVar[type[BaseModel]] = VSphereConfig
    select_model: ClassVar[type[BaseModel]] = VSphereSelect
    # Optional plugin surface (patchd.plugins.implicit_health): the check a group gets
    # without health.command/http/tcp, named in the warning about an unset stable_for.
    implicit_health: ClassVar[str] = (
        "a VM counts as healthy once VMware Tools stays running, a host once it stays"
        " connected and out of maintenance mode"
    )

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config: VSphereConfig = (
            config if isinstance(config, VSphereConfig) else VSphereConfig.model_validate(config)
        )
        self.session = Session(name, self.config)
        self.tags = Tags(self.session)
        self.vms = VmFlow(name, self.session, self.config)
        self.hosts = HostFlow(name, self.session, self.config)

    def _flow(self, target: Target) -> VmFlow | HostFlow:
        return self.hosts if target.kind == "host" else self.vms

    @classmethod
    def check_group(
        cls, backend: str, config: VSphereConfig, select: VSphereSelect, patch: PatchModel
    ) -> list[tuple[tuple[str, ...], str]]:
        return check_group(backend, config, select, patch)

    def ping(self) -> None:
        def work(content: Any) -> None:
            if content.sessionManager.currentSession is None:  # how vCenter says "expired"
                vim, _ = vmomi()
                raise vim.fault.NotAuthenticated()

        with step(self.session, f"vsphere {self.config.address}"):
            self.session.call("ping", work)

    def close(self) -> None:
        self.tags.close()
        self.session.close()

    def discover(self, select: BaseModel) -> Sequence[Target]:
        if not isinstance(select, VSphereSelect):
            select = VSphereSelect.model_validate(select.model_dump())
        with step(self.session, "discovering targets"):
            return inventory.discover(self.session, self.tags, select)

    def check_update(
        self, target: Target, pins: Mapping[str, str], patch: PatchModel
    ) -> Update | None:
        return self._flow(target).check_update(target, pins, patch)

    def assess(
        self,
        target: Target,
        pins: Mapping[str, str],
        patch: PatchModel,
        baseline: BaselineModel | None,
        journal: FirstSeen,
        now: datetime,
    ) -> Assessment | None:
        """A VM patched with method "apt" or "dnf": what is pending in its guest and what
        the group's baseline lets in (patchd.guest.assessment). None for an ESXi host or a
        "command" group: check_update decides for those."""
        if target.kind == "host" or patch.method not in PACKAGE_METHODS:
            return None
        return self.vms.assess(target, pins, baseline, journal, now, patch.method)

    def describe(self, target: Target) -> Mapping[str, str]:
        return self._flow(target).describe(target)

    def plan_snapshot(self, target: Target, run_id: str) -> Snapshot:
        return self._flow(target).plan_snapshot(target, run_id)

    def snapshot(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Snapshot:
        return self._flow(target).snapshot(target, snapshot, options)

    def apply(self, target: Target, update: Update, snapshot: Snapshot, patch: PatchModel) -> None:
        self._flow(target).apply(target, update, snapshot, patch)

    def verify(self, target: Target, update: Update, health: HealthModel) -> None:
        self._flow(target).verify(target, update, health)

    def commit(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Retained | None:
        if target.kind == "host":
            self.hosts.commit(target, snapshot, options)
            return None
        return self.vms.commit(target, snapshot, options)

    def release(self, retained: Mapping[str, Any]) -> None:
        if retained.get("kind", "vm") == "vm":
            self.vms.release(retained)

    def rollback(self, target: Target, snapshot: Snapshot) -> None:
        # The snapshot's data names its kind: a rollback from the journal after a restart
        # works even when the Target was rebuilt without one.
        kind = snapshot.data.get("kind") or target.kind
        (self.hosts if kind == "host" else self.vms).rollback(target, snapshot)

    # --- for the snapshot-age metric ----------------------------------------------------

    def patchd_snapshots(self) -> list[PatchdSnapshot]:
        """Every snapshot named patchd-* in the vCenter, oldest first (one collector call)."""
        with step(self.session, "listing patchd snapshots"):
            return self.vms.patchd_snapshots()

    def oldest_patchd_snapshot_age(self, now: datetime) -> float | None:
        """Age in seconds of the oldest patchd snapshot, or None when there is none."""
        created = [s.created for s in self.patchd_snapshots() if s.created is not None]
        return max((now - c).total_seconds() for c in created) if created else None
