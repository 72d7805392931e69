"""The ESXi host patch flow (`select.kind = "host"`): rolling, per cluster, via maintenance mode.

Each host's Target.partition is its cluster's moid, so the engine works on at most
`max_concurrency` hosts of one cluster at a time (default 1); the whole flow of a host,
maintenance mode included, happens while it holds one of those slots.

- check_update: `patch.version` against the host's `patchd.patch_version`, as for VMs
  (without a version every run patches). Pre-check: connected, not in maintenance mode,
  and no OTHER host of its cluster in maintenance mode unless this process is patching it
  right now. A host left in maintenance mode by a failed patch (or by a person) therefore
  halts the patching of its cluster: the remaining hosts are reported `failed` with the
  reason, and nothing is changed on them.
- snapshot: hosts have none; it records the host's state (not in maintenance mode, the
  recorded patch version) and marks it in flight.
- apply: enter maintenance mode (`maintenance_timeout`; DRS evacuates the VMs), run
  `patch.command`, with `patch.reboot` reboot the host and wait for it to reconnect
  (`reboot_timeout`), then exit maintenance mode.
- verify: connected and out of maintenance mode, for `health.stable_for`, within
  `health.timeout`.
- commit: records the version.
- rollback: there is nothing to revert to. A failed host is taken OUT OF SERVICE instead:
  it is left in maintenance mode (put back into it if it had already left), never returned
  to service broken. When it is safely in maintenance mode, rollback raises
  LeftOutOfService and the engine reports the target `out_of_service` (not rolled back:
  nothing was) with the failure; a person fixes it and exits
  maintenance mode, which also lets its cluster be patched again. Only if the host cannot
  be put into maintenance mode (disconnected, evacuation fails) does rollback raise
  RollbackFailed (`rollback_failed`): then it may be in service in a broken state. A host
  whose patch never started (the plan only, or a snapshot taken by this process and no
  apply) is left as it is; after a restart patchd cannot tell, and takes it out of service.

vcsim 0.24.2 cannot show: DRS evacuation (entering maintenance mode there does not move
VMs), a host reboot (RebootHost_Task is not implemented: with `patch.reboot` the step fails
there), nor a host disconnecting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, NoReturn

from patchd import poll
from patchd.backends.base import (
    LeftOutOfService,
    NotNow,
    Snapshot,
    StepFailed,
    Target,
    TransientError,
    Update,
)
from patchd.backends.vsphere import attributes
from patchd.backends.vsphere.attributes import VERSION
from patchd.backends.vsphere.collector import retrieve
from patchd.backends.vsphere.config import VSphereConfig
from patchd.backends.vsphere.connection import Session, vmomi
from patchd.backends.vsphere.flow import POLL, Flow, Kind, snapshot_name
from patchd.backends.vsphere.steps import step
from patchd.config.schema import PatchModel, SnapshotModel

CONNECTED = "connected"
HOST_PROPS = (
    "name",
    "parent",
    "runtime.connectionState",
    "runtime.inMaintenanceMode",
    "summary.runtime.bootTime",
    "hardware.systemInfo.uuid",
    "config.network.vnic",
    "customValue",
)


@dataclass
class HostState:
    moid: str
    ref: Any
    name: str
    connection: str
    in_maintenance: bool
    cluster: str | None
    boot_time: datetime | None
    uuid: str
    ip: str
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return self.name


class HostFlow(Flow[HostState]):
    """The host half of the vSphere backend."""

    kind: ClassVar[Kind] = Kind("host", "host", "host ", "HostSystem", HOST_PROPS)

    def __init__(self, backend: str, session: Session, config: VSphereConfig) -> None:
        super().__init__(backend, session, config)
        # Hosts this process is patching now (between snapshot and commit/rollback).
        self.in_flight: set[str] = set()
        # (host, snapshot name) whose snapshot this process took / whose apply began.
        self._snapshotted: set[tuple[str, str]] = set()
        self._touched: set[tuple[str, str]] = set()

    # --- reading ------------------------------------------------------------------------

    def build(
        self, moid: str, ref: Any, props: Mapping[str, Any], fields: dict[int, str]
    ) -> HostState:
        vim, _ = vmomi()
        parent = props.get("parent")
        vnics = props.get("config.network.vnic") or []
        ips = [str(v.spec.ip.ipAddress) for v in vnics if getattr(v.spec.ip, "ipAddress", None)]
        return HostState(
            moid=moid,
            ref=ref,
            name=str(props["name"]),
            connection=str(props.get("runtime.connectionState", "")),
            in_maintenance=bool(props.get("runtime.inMaintenanceMode")),
            cluster=str(parent._moId) if isinstance(parent, vim.ClusterComputeResource) else None,
            boot_time=props.get("summary.runtime.bootTime"),
            uuid=str(props.get("hardware.systemInfo.uuid") or ""),
            ip=ips[0] if ips else "",
            attributes=attributes.values(props.get("customValue"), fields),
        )

    def cluster_maintenance(self, cluster: str) -> dict[str, tuple[str, bool]]:
        """moid -> (name, in maintenance mode) for every host of a cluster (one call)."""
        vim, vmodl = vmomi()

        pc = vmodl.query.PropertyCollector

        def work(content: Any) -> dict[str, tuple[str, bool]]:
            obj = vim.ClusterComputeResource(cluster, self.session.stub)
            traverse = pc.TraversalSpec(
                name="hosts", path="host", skip=False, type=vim.ComputeResource
            )
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=obj, skip=True, selectSet=[traverse])],
                propSet=[
                    pc.PropertySpec(
                        type=vim.HostSystem, pathSet=["name", "runtime.inMaintenanceMode"]
                    )
                ],
            )
            found = retrieve(content.propertyCollector, [spec])
            return {
                f.moid: (str(f.get("name", "")), bool(f.get("runtime.inMaintenanceMode")))
                for f in found
            }

        return self.session.call(f"reading the hosts of cluster {cluster}", work)

    def own_facts(self, state: HostState) -> dict[str, str]:
        return {
            "connection_state": state.connection,
            "in_maintenance": "true" if state.in_maintenance else "false",
            "cluster": state.cluster or "",
        }

    # --- helpers ------------------------------------------------------------------------

    def _enter_maintenance(self, state: HostState) -> None:
        limit = self.config.maintenance_timeout.total_seconds()
        self.task(
            f"entering maintenance mode on {state.name}",
            lambda content: state.ref.EnterMaintenanceMode_Task(timeout=int(limit)),
            timeout=limit + 60,
        )

    def _others_in_maintenance(self, state: HostState) -> list[str]:
        if state.cluster is None:
            return []
        hosts = self.cluster_maintenance(state.cluster)
        with self._lock:
            busy = set(self.in_flight)
        return sorted(
            name
            for moid, (name, in_maintenance) in hosts.items()
            if in_maintenance and moid != state.moid and moid not in busy
        )

    def precheck(self, state: HostState) -> None:
        if state.connection != CONNECTED:
            raise StepFailed(f"host {state.name} is {state.connection or 'in an unknown state'}")
        if state.in_maintenance:
            raise StepFailed(
                f"host {state.name} is in maintenance mode already: patchd does not take a"
                " host out of maintenance mode it did not put it in (a failed patch leaves it"
                " there for a person to look at)"
            )
        others = self._others_in_maintenance(state)
        if others:
            # Not this host's failure: it is left pending until the cluster is whole.
            raise NotNow(
                f"host {state.name}: {', '.join(others)} of its cluster is in maintenance mode"
                " and not being patched by this run: patching of this cluster is halted until"
                " it is back in service"
            )

    # --- the flow -----------------------------------------------------------------------

    def plan_snapshot(self, target: Target, run_id: str) -> Snapshot:
        return Snapshot(
            target.id, {"kind": "host", "host": target.id, "name": snapshot_name(run_id)}
        )

    def snapshot(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Snapshot:
        name = str(snapshot.data["name"])
        key = (target.id, name)
        with step(self.session, f"recording the state of {target.name}"):
            state = self.read(target.id)
            with self._lock:
                ours = key in self._snapshotted
            if not ours:
                self.precheck(state)
        with self._lock:
            self._snapshotted.add(key)
            self.in_flight.add(target.id)
        data = {
            **snapshot.data,
            "taken": True,
            "in_maintenance": state.in_maintenance,
            "version_before": state.attributes.get(VERSION, ""),
        }
        return Snapshot(snapshot.target_id, data)

    def apply(self, target: Target, update: Update, snapshot: Snapshot, patch: PatchModel) -> None:
        name = str(snapshot.data["name"])
        key = (target.id, name)
        if not snapshot.data.get("taken"):
            raise StepFailed(f"{target.name}: its state was not recorded before the patch")
        with step(self.session, f"patching host {target.name}") as progress:
            state = self.read(target.id)
            if not state.in_maintenance:
                others = self._others_in_maintenance(state)
                if others:
                    raise StepFailed(
                        f"host {target.name}: {', '.join(others)} of its cluster is in"
                        " maintenance mode and not being patched by this run; not entering"
                        " maintenance mode"
                    )
                progress.changed = True
                with self._lock:
                    self._touched.add(key)
                self._enter_maintenance(state)
                state = self.read(target.id)
                if not state.in_maintenance:
                    raise StepFailed(
                        f"host {target.name} is not in maintenance mode after entering it"
                    )
            progress.changed = True
            with self._lock:
                self._touched.add(key)
            if patch.command:
                self.run_patch_command(target, state, update, name, patch)
            if patch.reboot:
                self._reboot(state)
            self.task(
                f"exiting maintenance mode on {target.name}",
                lambda content: state.ref.ExitMaintenanceMode_Task(
                    timeout=int(self.config.task_timeout.total_seconds())
                ),
            )
        self.installed(target, name, update.available)

    def _reboot(self, state: HostState) -> None:
        self.task(
            f"rebooting host {state.name}", lambda content: state.ref.RebootHost_Task(force=False)
        )
        limit = self.config.reboot_timeout.total_seconds()

        def back() -> bool | None:
            try:
                now = self.read(state.moid)
            except TransientError:
                return None  # vCenter itself may be busy with the reconnect
            return (now.connection == CONNECTED and now.boot_time != state.boot_time) or None

        def expired() -> NoReturn:
            raise StepFailed(
                f"host {state.name} did not come back from its reboot within {limit:g}s"
            )

        poll.until(back, self.clock.deadline(limit), expired, POLL * 4, self.clock)

    def healthy(self, target: Target, state: HostState) -> bool:
        return state.connection == CONNECTED and not state.in_maintenance

    def unhealthy(self, target: Target, state: HostState, stable_for: float, timeout: float) -> str:
        where = "in maintenance mode" if state.in_maintenance else "out of maintenance mode"
        return (
            f"host {target.name} is {state.connection} and {where}, not connected"
            f" and in service for {stable_for:g}s within {timeout:g}s"
        )

    def commit(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> None:
        name = str(snapshot.data["name"])
        version = self.applied_version(target, snapshot)
        with step(self.session, f"commit of host {target.name}", retry_safe=True):
            self.record_version(self.read(target.id), version)
        self._forget((target.id, name))

    def _forget(self, key: tuple[str, str]) -> None:
        self.forget(*key)
        with self._lock:
            self.in_flight.discard(key[0])
            self._touched.discard(key)
            self._snapshotted.discard(key)

    def rollback(self, target: Target, snapshot: Snapshot) -> None:
        name = str(snapshot.data.get("name", ""))
        key = (target.id, name)
        if not snapshot.data.get("taken"):
            self._forget(key)
            return
        what = (
            f"host {target.name} could not be put into maintenance mode after a failed"
            " patch and may be in service"
        )
        with self.rollback_failure(what):
            left = self._rollback(target, snapshot, key)
        self._forget(key)
        if left:
            raise LeftOutOfService(
                f"host {target.name} is left in maintenance mode (nothing was rolled back):"
                " a person must fix it and exit maintenance mode"
            )

    def _rollback(self, target: Target, snapshot: Snapshot, key: tuple[str, str]) -> bool:
        """Whether the host is left in maintenance mode (out of service)."""
        state = self.read(target.id)
        with self._lock:
            untouched = key in self._snapshotted and key not in self._touched
        if not state.in_maintenance and not untouched:
            self._enter_maintenance(state)
            state = self.read(target.id)
            if not state.in_maintenance:
                raise StepFailed("it is still out of maintenance mode")
        self.restore_version(state, snapshot)
        if state.in_maintenance:
            self.log.warning(
                "vsphere_host_left_in_maintenance",
                backend=self.backend,
                host=target.name,
                reason="its patch failed: a person must fix it and exit maintenance mode",
            )
        return state.in_maintenance
