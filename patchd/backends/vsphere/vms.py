"""The VM patch flow: pre-check, snapshot, patch.command, verify by VMware Tools, commit.

- check_update: the group's `patch.version` (or the stage pin of ref "patch") against the
  VM's `patchd.patch_version` attribute. Without `patch.version` every run patches every
  selected VM (available = "unversioned", nothing is recorded on commit): a group that
  names a command but no version gets its command run each window, as a cron'ed update
  would, rather than silently nothing. When an update is due, the pre-check runs: the VM
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

import contextlib
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from patchd import faults, log
from patchd.backends.base import (
    JOURNALED_VERSION,
    Retained,
    RollbackFailed,
    Snapshot,
    StepFailed,
    Target,
    TransientError,
    Update,
)
from patchd.backends.vsphere import attributes, command
from patchd.backends.vsphere.attributes import KEPT, VERSION
from patchd.backends.vsphere.collector import (
    TaskFailed,
    TaskTimeout,
    read,
    retrieve,
    view_spec,
    wait_for_task,
)
from patchd.backends.vsphere.config import VSphereConfig
from patchd.backends.vsphere.connection import Session, fault_text, vmomi
from patchd.backends.vsphere.steps import step
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel

REF = "patch"
UNVERSIONED = "unversioned"
PREFIX = "patchd-"
POWERED_ON = "poweredOn"
POWERED_OFF = "poweredOff"
TOOLS_RUNNING = "guestToolsRunning"
GREEN = "green"
POLL = 0.5
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


def read_with_field_names(
    content: Any, obj: Any, props: Iterable[str], label: str
) -> tuple[Mapping[str, Any], dict[int, str]]:
    """One object's properties and the custom field names (key -> name), in one call.

    Raises Gone when the object no longer exists.
    """
    vim, vmodl = vmomi()
    try:
        found = read(
            content.propertyCollector,
            [obj, content.customFieldsManager],
            {type(obj): props, vim.CustomFieldsManager: ["field"]},
        )
    except vmodl.fault.ManagedObjectNotFound:
        raise Gone(f"{label} no longer exists") from None
    names: dict[int, str] = {}
    mine: Mapping[str, Any] | None = None
    for item in found:
        if isinstance(item.obj, vim.CustomFieldsManager):
            names = attributes.field_names(item.get("field"))
        elif item.moid == obj._moId:
            mine = item.props
    if mine is None or "name" not in mine:
        raise Gone(f"{label} no longer exists")
    return mine, names


class Gone(StepFailed):
    """The VM no longer exists."""


@dataclass(frozen=True)
class SnapshotNode:
    name: str
    moid: str
    ref: Any
    created: datetime | None
    state: str
    description: str


@dataclass(frozen=True)
class PatchdSnapshot:
    """A patchd snapshot somewhere in the vCenter (see `VSphereBackend.patchd_snapshots`)."""

    vm: str
    vm_name: str
    name: str
    created: datetime | None
    kept: bool


def flatten(info: Any) -> list[SnapshotNode]:
    """Every node of a VM's snapshot tree (`snapshot` may be missing: no snapshots)."""
    nodes: list[SnapshotNode] = []
    pending = list(getattr(info, "rootSnapshotList", None) or [])
    while pending:
        tree = pending.pop(0)
        nodes.append(
            SnapshotNode(
                name=str(tree.name),
                moid=str(tree.snapshot._moId),
                ref=tree.snapshot,
                created=tree.createTime,
                state=str(tree.state or ""),
                description=str(tree.description or ""),
            )
        )
        pending.extend(tree.childSnapshotList or [])
    return nodes


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


def snapshot_name(run_id: str) -> str:
    return PREFIX + re.sub(r"[^A-Za-z0-9_.:-]", "-", run_id)


class VmFlow:
    """The VM half of the vSphere backend."""

    def __init__(self, backend: str, session: Session, config: VSphereConfig) -> None:
        self.backend = backend
        self.session = session
        self.config = config
        self.log = log.get("patchd.vsphere")
        self.sleep = time.sleep
        # (vm moid, snapshot name) -> version applied and not yet committed, in this process.
        self._installed: dict[tuple[str, str], str] = {}
        # vm moid -> names of the patchd snapshots this process is working with now.
        self._active: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    # --- reading ------------------------------------------------------------------------

    def read(self, moid: str) -> VmState:
        vim, _ = vmomi()

        def work(content: Any) -> VmState:
            vm = vim.VirtualMachine(moid, self.session.stub)
            props, names = read_with_field_names(content, vm, VM_PROPS, f"VM {moid}")
            return VmState(
                moid=moid,
                ref=vm,
                name=str(props["name"]),
                power=str(props.get("runtime.powerState", "")),
                tools=props.get("guest.toolsRunningStatus"),
                heartbeat=props.get("guestHeartbeatStatus"),
                ip=str(props.get("guest.ipAddress") or ""),
                hostname=str(props.get("guest.hostName") or ""),
                uuid=str(props.get("config.uuid") or ""),
                boot_time=props.get("summary.runtime.bootTime"),
                snapshots=flatten(props.get("snapshot")),
                attributes=attributes.values(props.get("customValue"), names),
            )

        return self.session.call(f"reading VM {moid}", work)

    def facts(self, state: VmState) -> dict[str, str]:
        return {
            "name": state.name,
            "moid": state.moid,
            "kind": "vm",
            "uuid": state.uuid,
            "ip": state.ip,
            "hostname": state.hostname,
            "power_state": state.power,
            "tools": str(state.tools or ""),
            "heartbeat": str(state.heartbeat or ""),
            "patch_version": state.attributes.get(VERSION, ""),
        }

    def describe(self, target: Target) -> Mapping[str, str]:
        with step(self.session, f"describing {target.name}"):
            return self.facts(self.read(target.id))

    # --- writing helpers ----------------------------------------------------------------

    def _task(self, what: str, start: Any, timeout: float | None = None) -> Any:
        """Start a task with `start(content)` (a change: not retried) and wait for it."""
        task = self.session.call(what, start, mutating=True)
        limit = self.config.task_timeout.total_seconds() if timeout is None else timeout
        return self.session.call(
            what,
            lambda content: wait_for_task(content.propertyCollector, task, what, limit),
        )

    def _set(self, state: VmState, name: str, value: str) -> None:
        self.session.call(
            f"setting {name} on {state.name}",
            lambda content: attributes.set_value(content, state.ref, name, value),
            mutating=True,
        )

    def _remove(self, state: VmState, node: SnapshotNode) -> None:
        self._task(
            f"removing snapshot {node.name} of {state.name}",
            lambda content: node.ref.RemoveSnapshot_Task(removeChildren=False, consolidate=True),
        )

    def _unlist_kept(self, moid: str, name: str) -> None:
        state = self.read(moid)
        if name in state.kept:
            self._set(state, KEPT, " ".join(n for n in state.kept if n != name))

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
        if state.power != POWERED_ON:
            raise StepFailed(
                f"{state.name} is {state.power or 'in an unknown power state'}: patchd patches"
                " powered-on VMs only and does not power them on"
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
        with step(self.session, f"checking {target.name} for an update"):
            state = self.read(target.id)
        recorded = state.attributes.get(VERSION, "")
        wanted = pins.get(REF, patch.version)
        if wanted is not None and wanted == recorded:
            return None
        if patch.command is None and not patch.reboot:
            raise StepFailed(
                f"{target.name}: the group sets neither patch.command nor patch.reboot:"
                " nothing to patch with"
            )
        self.precheck(state)
        return Update(ref=REF, current=recorded, available=wanted or UNVERSIONED)

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
                self._task(
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
        return Snapshot(snapshot.target_id, data)

    def apply(self, target: Target, update: Update, snapshot: Snapshot, patch: PatchModel) -> None:
        name = str(snapshot.data["name"])
        if not snapshot.data.get("moref"):
            raise StepFailed(f"{target.name}: snapshot {name} was not taken")
        with step(self.session, f"patching {target.name}") as progress:
            state = self.read(target.id)
            if state.find(name, snapshot.data["moref"]) is None:
                raise StepFailed(f"{target.name}: snapshot {name} is gone; not patching")
            if patch.command:
                values = {
                    "name": state.name,
                    "moid": state.moid,
                    "uuid": state.uuid,
                    "ip": state.ip,
                    "hostname": state.hostname,
                }
                argv = command.fill(patch.command, values, target.name)
                env = command.environment(
                    self.facts(state),
                    {
                        "PATCHD_TARGET_ID": target.id,
                        "PATCHD_TARGET_NAME": target.name,
                        "PATCHD_TARGET_KIND": target.kind,
                        "PATCHD_RUN_ID": name.removeprefix(PREFIX),
                        "PATCHD_PATCH_VERSION": update.available,
                    },
                )
                progress.changed = True
                command.run(argv, env, patch.timeout.total_seconds(), target.name)
            if patch.reboot:
                progress.changed = True
                self._reboot(self.read(target.id))
        with self._lock:
            self._installed[(target.id, name)] = update.available

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
        self._task(f"power cycling {state.name}", lambda content: state.ref.ResetVM_Task())

    def _await_guest_down(self, before: VmState) -> None:
        """After RebootGuest: wait until the guest is seen going down (Tools stop, or a
        new boot time), so verify does not pass on the state from before the reboot."""
        deadline = time.monotonic() + self.config.reboot_timeout.total_seconds()
        while True:
            now = self.read(before.moid)
            if now.tools != TOOLS_RUNNING or now.boot_time != before.boot_time:
                return
            if time.monotonic() >= deadline:
                raise StepFailed(
                    f"{before.name}: the guest did not go down for its reboot within"
                    f" {self.config.reboot_timeout.total_seconds():g}s"
                )
            self.sleep(POLL)

    def verify(self, target: Target, update: Update, health: HealthModel) -> None:
        timeout = health.timeout.total_seconds()
        stable_for = health.stable_for.total_seconds()
        deadline = time.monotonic() + timeout
        good_since: float | None = None
        with step(self.session, f"verifying {target.name}"):
            while True:
                state = self.read(target.id)
                now = time.monotonic()
                if state.power != POWERED_ON:
                    raise StepFailed(f"{target.name} is {state.power} after the patch")
                if state.tools_ok:
                    good_since = now if good_since is None else good_since
                    if now - good_since >= stable_for:
                        return
                else:
                    good_since = None
                if now >= deadline:
                    raise StepFailed(
                        f"{target.name}: VMware Tools not running with a green heartbeat for"
                        f" {stable_for:g}s within {timeout:g}s (tools {state.tools or 'unknown'},"
                        f" heartbeat {state.heartbeat or 'unknown'})"
                    )
                self.sleep(min(POLL, max(0.0, deadline - now)))

    def commit(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Retained | None:
        name = str(snapshot.data["name"])
        key = (target.id, name)
        with self._lock:
            version = self._installed.get(key) or snapshot.data.get(JOURNALED_VERSION)
        if version is None:
            raise StepFailed(
                f"{target.name}: commit of {name} without a patch applied by this process"
            )
        retained = None
        with step(self.session, f"commit of {target.name}", retry_safe=True) as progress:
            state = self.read(target.id)
            progress.changed = True
            if version != UNVERSIONED and state.attributes.get(VERSION) != version:
                self._set(state, VERSION, version)
            faults.hit("vsphere.during_commit")
            node = state.find(name, snapshot.data.get("moref"))
            if node is not None and options.keep:
                if name not in state.kept:
                    self._set(state, KEPT, " ".join([*state.kept, name]))
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
            self._rollback(target, snapshot)
        except (RollbackFailed, TransientError):
            raise
        except (TaskFailed, TaskTimeout, StepFailed) as err:
            text = self.session.scrub(f"rollback of {target.name} to {name}: {err}")
            raise RollbackFailed(text) from None
        except Exception as err:
            text = self.session.scrub(fault_text(err))
            raise RollbackFailed(f"rollback of {target.name} to {name}: {text}") from None
        finally:
            # Whatever happened, a snapshot still there is now a leftover: it blocks the
            # next patch of this VM until a rollback removes it.
            self._activate(target.id, name, False)

    def _rollback(self, target: Target, snapshot: Snapshot) -> None:
        data = snapshot.data
        name = str(data["name"])
        state = self.read(target.id)
        node = state.find(name, data.get("moref"))
        if node is not None:
            try:
                self._task(
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
            self._task(f"powering on {target.name}", lambda content: state.ref.PowerOnVM_Task())
        elif wanted == POWERED_OFF and state.power == POWERED_ON:
            self._task(f"powering off {target.name}", lambda content: state.ref.PowerOffVM_Task())
        if node is not None and data.get("tools_ok"):
            self._await_tools(target, name)
        before = data.get("version_before")
        state = self.read(target.id)
        if before is not None and state.attributes.get(VERSION, "") != before:
            self._set(state, VERSION, str(before))
        if node is not None:
            self._remove(state, node)
        if name in state.kept:
            self._unlist_kept(target.id, name)

    def _await_tools(self, target: Target, name: str) -> None:
        limit = self.config.rollback_timeout.total_seconds()
        deadline = time.monotonic() + limit
        while True:
            state = self.read(target.id)
            if state.power == POWERED_ON and state.tools_ok:
                return
            if time.monotonic() >= deadline:
                raise RollbackFailed(
                    f"{target.name} was reverted to {name} and is {state.power}, but VMware Tools"
                    f" did not report it healthy within {limit:g}s (tools"
                    f" {state.tools or 'unknown'}, heartbeat {state.heartbeat or 'unknown'});"
                    f" snapshot {name} is kept"
                )
            self.sleep(POLL)

    # --- the snapshot-age metric --------------------------------------------------------

    def patchd_snapshots(self) -> list[PatchdSnapshot]:
        """Every patchd snapshot in the vCenter, oldest first (one collector call)."""
        vim, _ = vmomi()

        def work(content: Any) -> list[PatchdSnapshot]:
            view = content.viewManager.CreateContainerView(
                content.rootFolder, [vim.VirtualMachine], True
            )
            try:
                spec = view_spec(
                    view,
                    {
                        vim.VirtualMachine: ["name", "snapshot", "customValue"],
                        vim.CustomFieldsManager: ["field"],
                    },
                    extra=[content.customFieldsManager],
                )
                found = retrieve(content.propertyCollector, [spec])
            finally:
                with contextlib.suppress(Exception):
                    view.DestroyView()
            return _patchd_snapshots(found)

        return self.session.call("listing patchd snapshots", work)


def _patchd_snapshots(found: Iterable[Any]) -> list[PatchdSnapshot]:
    vim, _ = vmomi()

    found = list(found)
    names: dict[int, str] = {}
    for item in found:
        if isinstance(item.obj, vim.CustomFieldsManager):
            names = attributes.field_names(item.get("field"))
    result: list[PatchdSnapshot] = []
    for item in found:
        if not isinstance(item.obj, vim.VirtualMachine):
            continue
        kept = set(
            attributes.split_names(attributes.values(item.get("customValue"), names).get(KEPT, ""))
        )
        for node in flatten(item.get("snapshot")):
            if node.name.startswith(PREFIX):
                result.append(
                    PatchdSnapshot(
                        item.moid,
                        str(item.get("name", "")),
                        node.name,
                        node.created,
                        node.name in kept,
                    )
                )
    return sorted(result, key=lambda s: (s.created.timestamp() if s.created else 0.0, s.vm, s.name))
