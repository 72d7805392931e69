"""The VM patch flow: pre-check, snapshot, patch.command, verify by VMware Tools, commit.

- check_update: with `patch.method = "apt"` or `"dnf"`, the pre-check, then the guest's pending
  package set over SSH (guestos.py; `assess` also applies the group's baseline: what it
  holds back and why, for plan and compliance). Otherwise the group's `patch.version`
  (or the stage pin of ref "patch") against the VM's `patchd.patch_version` attribute.
  Without `patch.version` every run patches every selected VM (available =
  "unversioned", nothing is recorded on commit): a group that names a command but no
  version gets its command run each window, as a cron'ed update would, rather than
  silently nothing. When an update is due, the pre-check runs: the VM
  is powered on, its VMware Tools state is known, and no patchd snapshot is left from an
  unfinished run (one not listed in `patchd.kept_snapshots`): such a VM is refused, and
  so reported by `plan` and the run, until that run is rolled back from patchd's journal.
- plan_snapshot: pure, no vCenter call: `{"kind": "vm", "vm": moid, "name": "patchd-RUN"}`.
- snapshot: `patchd-RUN` with `snapshot.memory` / `snapshot.quiesce`, or the existing one
  of that name (a retry). Its data adds the snapshot's moid, creation time, the power state
  it recorded, whether Tools were healthy, and the patch version recorded before.
- apply: `patch.command` (see `command.py`), then with `patch.reboot` a guest reboot
  (RebootGuest; a power cycle when Tools are not running). vcsim lacks RebootGuest, so
  there the backend falls back to the power cycle and says so in the log.
- verify: powered on, Tools running and heartbeat green, continuously for
  `health.stable_for`, within `health.timeout`. A powered-off VM fails at once.
- commit: records the version, then removes the snapshot, or with `snapshot.keep` lists
  it in `patchd.kept_snapshots` and returns it as Retained (`release` removes it).
- rollback (idempotent, from any partial state): revert to the snapshot when it exists,
  restore the power state it recorded, wait for Tools when they were healthy before,
  restore `patchd.patch_version`, then remove the snapshot. Until the VM is back, the
  snapshot is kept and RollbackFailed is raised. Snapshots of others are never touched.

`patchd_snapshots` lists every patchd snapshot of the vCenter with its age, for the
metric of the oldest one (no patchd snapshot may outlive its `keep`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from patchd import faults, poll
from patchd.backends.base import (
    NotRunning,
    Retained,
    RollbackFailed,
    Snapshot,
    StepFailed,
    Target,
    Update,
)
from patchd.backends.vsphere import attributes
from patchd.backends.vsphere.attributes import KEPT, VERSION
from patchd.backends.vsphere.collector import TaskFailed, TaskTimeout
from patchd.backends.vsphere.config import VSphereConfig
from patchd.backends.vsphere.connection import Session, fault_text, vmomi
from patchd.backends.vsphere.flow import (
    POLL,
    PREFIX,
    Flow,
    Gone,
    Kind,
    snapshot_name,
)
from patchd.backends.vsphere.guestos import METHODS, PACKAGES, GuestOs
from patchd.backends.vsphere.snapshots import (
    PatchdSnapshot,
    SnapshotNode,
    flatten,
    patchd_snapshots,
)
from patchd.backends.vsphere.steps import step
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel

if TYPE_CHECKING:
    from patchd.config.baselines import BaselineModel
    from patchd.guest.assessment import Assessment
    from patchd.guest.baseline import FirstSeen

__all__ = ["PatchdSnapshot", "VmFlow", "VmState"]

POWERED_ON = "poweredOn"
POWERED_OFF = "poweredOff"
TOOLS_RUNNING = "guestToolsRunning"
GREEN = "green"
VM_PROPS = (
    "name",
    "runtime.powerState",
    "summary.runtime.bootTime",
    "guest.toolsRunningStatus",
    "guestHeartbeatStatus",
    "guest.ipAddress",
    "guest.hostName",
    "config.uuid",
    "snapshot",
    "customValue",
)


@dataclass
class VmState:
    """One VM as read in one collector call."""

    moid: str
    ref: Any
    name: str
    power: str
    tools: str | None
    heartbeat: str | None
    ip: str
    hostname: str
    uuid: str
    boot_time: datetime | None
    snapshots: list[SnapshotNode] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def tools_ok(self) -> bool:
        return self.tools == TOOLS_RUNNING and self.heartbeat == GREEN

    @property
    def kept(self) -> list[str]:
        return attributes.split_names(self.attributes.get(KEPT, ""))

    def find(self, name: str, moid: str | None = None) -> SnapshotNode | None:
        named = [n for n in self.snapshots if n.name == name]
        exact = [n for n in named if moid is not None and n.moid == moid]
        best = exact or named
        return best[0] if best else None

    def leftovers(self, own: str | None = None) -> list[str]:
        kept = set(self.kept)
        return sorted(
            n.name
            for n in self.snapshots
            if n.name.startswith(PREFIX) and n.name not in kept | {own}
        )


class VmFlow(Flow[VmState]):
    """The VM half of the vSphere backend."""

    kind: ClassVar[Kind] = Kind("vm", "VM", "", "VirtualMachine", VM_PROPS)

    def __init__(self, backend: str, session: Session, config: VSphereConfig) -> None:
        super().__init__(backend, session, config)
        # vm moid -> names of the patchd snapshots this process is working with now.
        self._active: dict[str, set[str]] = {}
        # patch.method = "apt" or "dnf": the guest's packages over SSH (guestos.py).
        self.guestos = GuestOs(backend, config.guest, self.read) if config.guest else None

    # --- reading ------------------------------------------------------------------------

    def build(
        self, moid: str, ref: Any, props: Mapping[str, Any], fields: dict[int, str]
    ) -> VmState:
        return VmState(
            moid=moid,
            ref=ref,
            name=str(props["name"]),
            power=str(props.get("runtime.powerState", "")),
            tools=props.get("guest.toolsRunningStatus"),
            heartbeat=props.get("guestHeartbeatStatus"),
            ip=str(props.get("guest.ipAddress") or ""),
            hostname=str(props.get("guest.hostName") or ""),
            uuid=str(props.get("config.uuid") or ""),
            boot_time=props.get("summary.runtime.bootTime"),
            snapshots=flatten(props.get("snapshot")),
            attributes=attributes.values(props.get("customValue"), fields),
        )

    def own_facts(self, state: VmState) -> dict[str, str]:
        return {
            "power_state": state.power,
            "tools": str(state.tools or ""),
            "heartbeat": str(state.heartbeat or ""),
        }

    # --- writing helpers ----------------------------------------------------------------

    def _remove(self, state: VmState, node: SnapshotNode) -> None:
        self.task(
            f"removing snapshot {node.name} of {state.name}",
            lambda content: node.ref.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
        )

    def _unlist_kept(self, moid: str, name: str) -> None:
        state = self.read(moid)
        if name in state.kept:
            self.set_attribute(state, KEPT, " ".join(n for n in state.kept if n != name))

    # --- the flow -----------------------------------------------------------------------

    def _activate(self, moid: str, name: str, active: bool) -> None:
        with self._lock:
            names = self._active.setdefault(moid, set())
            if active:
                names.add(name)
            else:
                names.discard(name)
                self._installed.pop((moid, name), None)

    def precheck(self, state: VmState, own: str | None = None) -> None:
        """Refuse a VM patchd must not patch now (StepFailed; nothing was changed)."""
        if state.power is None:
            raise StepFailed(f"{state.name} is in an unknown power state")
        if state.power != POWERED_ON:
            raise NotRunning(
                f"{state.name} is {state.power}: patchd patches powered-on VMs only and does"
                " not power them on"
            )
        if state.tools is None:
            raise StepFailed(f"{state.name}: its VMware Tools state is unknown")
        with self._lock:
            active = set(self._active.get(state.moid, ()))
        leftovers = [n for n in state.leftovers(own) if n not in active]
        if leftovers:
            raise StepFailed(
                f"{state.name} has {', '.join(leftovers)} left by an unfinished (or still"
                " running) patchd run:"
                " roll that run back first (patchd does so from its journal) or remove the"
                " snapshot by hand"
            )

    def check_update(
        self, target: Target, pins: Mapping[str, str], patch: PatchModel
    ) -> Update | None:
        if patch.method not in METHODS:
            return super().check_update(target, pins, patch)
        return self._prechecked(target, patch.method).check(target, pins, patch.method)

    def assess(
        self,
        target: Target,
        pins: Mapping[str, str],
        baseline: BaselineModel | None,
        journal: FirstSeen,
        now: datetime,
        method: str,
    ) -> Assessment:
        """patch.method "apt" or "dnf": the guest's pending packages under the group's
        baseline (held back and why, what a run installs), after the pre-check."""
        return self._prechecked(target, method).assess(target, pins, method, baseline, journal, now)

    def _prechecked(self, target: Target, method: str) -> GuestOs:
        """The guest side, once the VM passed the pre-check (method "apt" or "dnf")."""
        if self.guestos is None:  # check-config refuses this; a config built in code may not
            raise StepFailed(f"{target.name}: method {method} needs backends.{self.backend}.guest")
        with step(self.session, f"pre-check of {target.name}"):
            self.precheck(self.read(target.id))
        return self.guestos

    def plan_snapshot(self, target: Target, run_id: str) -> Snapshot:
        return Snapshot(target.id, {"kind": "vm", "vm": target.id, "name": snapshot_name(run_id)})

    def snapshot(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Snapshot:
        name = str(snapshot.data["name"])
        run = name.removeprefix(PREFIX)
        with step(self.session, f"snapshot of {target.name}", retry_safe=True) as progress:
            state = self.read(target.id)
            node = state.find(name)
            if node is None:
                self.precheck(state, own=name)
                self._activate(target.id, name, True)
                progress.changed = True
                self.task(
                    f"creating snapshot {name} of {target.name}",
                    lambda content: state.ref.CreateSnapshot_Task(
                        name=name,
                        description=f"patchd run {run} (backend {self.backend}): the state"
                        " before the patch; patchd removes it on commit, rollback or expiry",
                        memory=options.memory,
                        quiesce=options.quiesce,
                    ),
                )
                faults.hit("vsphere.after_snapshot_task")
                state = self.read(target.id)
                node = state.find(name)
                if node is None:
                    raise StepFailed(f"snapshot {name} of {target.name} is missing after creation")
            self._activate(target.id, name, True)
        data = {
            **snapshot.data,
            "moref": node.moid,
            "created": node.created.isoformat() if node.created else None,
            "power_state": node.state or state.power,
            "tools_ok": state.tools_ok,
            "version_before": state.attributes.get(VERSION, ""),
        }
        if self.guestos is not None and self.guestos.checked(target):
            data["recorded"] = self.guestos.record(target)  # the guest's packages before
        return Snapshot(snapshot.target_id, data)

    def apply(self, target: Target, update: Update, snapshot: Snapshot, patch: PatchModel) -> None:
        name = str(snapshot.data["name"])
        if not snapshot.data.get("moref"):
            raise StepFailed(f"{target.name}: snapshot {name} was not taken")
        with step(self.session, f"patching {target.name}") as progress:
            state = self.read(target.id)
            if state.find(name, snapshot.data["moref"]) is None:
                raise StepFailed(f"{target.name}: snapshot {name} is gone; not patching")
            if patch.method in METHODS and self.guestos is not None:
                progress.changed = True
                self.guestos.install(target, update, snapshot.data, patch.reboot)
            elif patch.command:
                progress.changed = True
                self.run_patch_command(target, state, update, name, patch)
            if patch.reboot and patch.method not in METHODS:
                progress.changed = True
                self._reboot(self.read(target.id))
        self.installed(target, name, update.available)

    def _reboot(self, state: VmState) -> None:
        vim, vmodl = vmomi()

        if state.tools == TOOLS_RUNNING:
            try:
                self.session.call(
                    f"rebooting the guest of {state.name}",
                    lambda content: state.ref.RebootGuest(),
                    mutating=True,
                )
            except (
                vim.fault.ToolsUnavailable,
                vmodl.fault.MethodNotFound,
                vmodl.fault.NotSupported,
            ) as err:
                self.log.warning(
                    "vsphere_guest_reboot_unavailable",
                    vm=state.name,
                    error=fault_text(err),
                    fallback="power cycle (reset)",
                )
            else:
                self._await_guest_down(state)
                return
        self.task(f"power cycling {state.name}", lambda content: state.ref.ResetVM_Task())

    def _await_guest_down(self, before: VmState) -> None:
        """After RebootGuest: wait until the guest is seen going down (Tools stop, or a
        new boot time), so verify does not pass on the state from before the reboot."""
        limit = self.config.reboot_timeout.total_seconds()

        def going_down() -> bool | None:
            now = self.read(before.moid)
            return now.tools != TOOLS_RUNNING or now.boot_time != before.boot_time or None

        def expired() -> NoReturn:
            raise StepFailed(
                f"{before.name}: the guest did not go down for its reboot within {limit:g}s"
            )

        poll.until(going_down, self.clock.deadline(limit), expired, POLL, self.clock)

    def verify(self, target: Target, update: Update, health: HealthModel) -> None:
        if self.guestos is not None and update.ref.startswith(PACKAGES):
            with step(self.session, f"verifying the guest of {target.name}"):
                self.guestos.verify(target, update, health.timeout.total_seconds())
        super().verify(target, update, health)

    def healthy(self, target: Target, state: VmState) -> bool:
        if state.power != POWERED_ON:
            raise StepFailed(f"{target.name} is {state.power} after the patch")
        return state.tools_ok

    def unhealthy(self, target: Target, state: VmState, stable_for: float, timeout: float) -> str:
        return (
            f"{target.name}: VMware Tools not running with a green heartbeat for"
            f" {stable_for:g}s within {timeout:g}s (tools {state.tools or 'unknown'},"
            f" heartbeat {state.heartbeat or 'unknown'})"
        )

    def commit(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Retained | None:
        name = str(snapshot.data["name"])
        version = self.applied_version(target, snapshot)
        retained = None
        with step(self.session, f"commit of {target.name}", retry_safe=True) as progress:
            state = self.read(target.id)
            progress.changed = True
            self.record_version(state, version)
            faults.hit("vsphere.during_commit")
            node = state.find(name, snapshot.data.get("moref"))
            if node is not None and options.keep:
                if name not in state.kept:
                    self.set_attribute(state, KEPT, " ".join([*state.kept, name]))
                retained = Retained(
                    data={
                        "backend": self.backend,
                        "kind": "vm",
                        "vm": target.id,
                        "vm_name": state.name,
                        "snapshot": name,
                        "moref": node.moid,
                    },
                    keep=options.keep,
                    description=f"snapshot {name} of VM {state.name}",
                )
            elif node is not None:
                self._remove(state, node)
        self._activate(target.id, name, False)
        if self.guestos is not None:
            self.guestos.forget(target)
        return retained

    def release(self, retained: Mapping[str, Any]) -> None:
        moid, name = str(retained["vm"]), str(retained["snapshot"])
        with step(self.session, f"releasing snapshot {name} of {moid}", retry_safe=True):
            try:
                state = self.read(moid)
            except Gone:
                return
            node = state.find(name, retained.get("moref"))
            if node is not None:
                self._remove(state, node)
            self._unlist_kept(moid, name)

    def rollback(self, target: Target, snapshot: Snapshot) -> None:
        name = str(snapshot.data.get("name", ""))
        try:
            with self.rollback_failure(f"rollback of {target.name} to {name}"):
                self._rollback(target, snapshot)
        finally:
            # Whatever happened, a snapshot still there is now a leftover: it blocks the
            # next patch of this VM until a rollback removes it.
            self._activate(target.id, name, False)
            if self.guestos is not None:
                self.guestos.forget(target)

    def _rollback(self, target: Target, snapshot: Snapshot) -> None:
        data = snapshot.data
        name = str(data["name"])
        state = self.read(target.id)
        node = state.find(name, data.get("moref"))
        if node is not None:
            try:
                self.task(
                    f"reverting {target.name} to {name}",
                    lambda content: node.ref.RevertToSnapshot_Task(suppressPowerOn=False),
                )
            except (TaskFailed, TaskTimeout) as err:
                raise RollbackFailed(
                    self.session.scrub(f"{target.name}: {err}; snapshot {name} is kept")
                ) from None
            faults.hit("vsphere.during_rollback")
            state = self.read(target.id)
        wanted = data.get("power_state") or (node.state if node is not None else None)
        if wanted == POWERED_ON and state.power != POWERED_ON:
            self.task(f"powering on {target.name}", lambda content: state.ref.PowerOnVM_Task())
        elif wanted == POWERED_OFF and state.power == POWERED_ON:
            self.task(f"powering off {target.name}", lambda content: state.ref.PowerOffVM_Task())
        if node is not None and data.get("tools_ok"):
            self._await_tools(target, name)
        state = self.read(target.id)
        self.restore_version(state, snapshot)
        if node is not None:
            self._remove(state, node)
        if name in state.kept:
            self._unlist_kept(target.id, name)

    def _await_tools(self, target: Target, name: str) -> None:
        limit = self.config.rollback_timeout.total_seconds()
        last: list[VmState] = []

        def back() -> bool | None:
            last[:] = [state := self.read(target.id)]
            return (state.power == POWERED_ON and state.tools_ok) or None

        def expired() -> NoReturn:
            state = last[-1]
            raise RollbackFailed(
                f"{target.name} was reverted to {name} and is {state.power}, but VMware Tools"
                f" did not report it healthy within {limit:g}s (tools"
                f" {state.tools or 'unknown'}, heartbeat {state.heartbeat or 'unknown'});"
                f" snapshot {name} is kept"
            )

        poll.until(back, self.clock.deadline(limit), expired, POLL, self.clock)

    def patchd_snapshots(self) -> list[PatchdSnapshot]:
        """Every patchd snapshot in the vCenter, oldest first (one collector call)."""
        return patchd_snapshots(self.session)
