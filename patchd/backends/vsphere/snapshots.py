"""VM snapshot trees as patchd reads them, and the list of every patchd snapshot in the
vCenter (for the metric that shows no patchd snapshot outlives its `snapshot.keep`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from patchd.backends.vsphere import attributes
from patchd.backends.vsphere.attributes import KEPT
from patchd.backends.vsphere.collector import retrieve, view_spec
from patchd.backends.vsphere.connection import Session, vmomi
from patchd.backends.vsphere.flow import PREFIX


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


def patchd_snapshots(session: Session) -> list[PatchdSnapshot]:
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

    return session.call("listing patchd snapshots", work)


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
