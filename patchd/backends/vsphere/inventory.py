"""Discovery: the VMs or hosts a group's `select` matches, read in one collector call.

Owns the inventory walk and the selectors. One ContainerView over the root folder and one
`RetrievePropertiesEx` (following continuation tokens) read name and parent of every
folder, datacenter, compute resource and host, plus the few VM properties selection needs
(`config.template`, `runtime.host`, `customValue`) and the custom field definitions. Paths,
datacenters and clusters are then worked out locally from the parent links: no per-object
round trip, whatever the inventory's size. Tags come from the REST API (see `tags.py`),
asked only when a selector names tags.

Templates are never targets. A VM's cluster is the cluster of the host it runs on. A
target's `labels` are its custom attributes; `patchd.depends_on` (names, comma separated)
becomes `depends_on`. Hosts are partitioned by cluster (the engine's concurrency limit
applies per cluster); standalone hosts share one budget.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from patchd.backends.base import Target
from patchd.backends.vsphere import attributes
from patchd.backends.vsphere.collector import Found, retrieve, view_spec
from patchd.backends.vsphere.config import VSphereSelect
from patchd.backends.vsphere.connection import Session, vmomi
from patchd.backends.vsphere.tags import Tags

TYPE_NAMES = {"vm": "VirtualMachine", "host": "HostSystem"}


@dataclass(frozen=True)
class Item:
    """One VM or host as discovery sees it."""

    moid: str
    name: str
    kind: str
    path: str
    datacenter: str | None
    cluster: str | None
    cluster_moid: str | None
    attributes: Mapping[str, str] = field(default_factory=dict)

    def target(self) -> Target:
        depends = attributes.split_names(self.attributes.get(attributes.DEPENDS_ON, ""))
        return Target(
            id=self.moid,
            name=self.name,
            kind=self.kind,
            labels=dict(self.attributes),
            depends_on=tuple(depends),
            partition=self.cluster_moid if self.kind == "host" else None,
        )


@dataclass
class _Node:
    name: str
    parent: str | None
    kind: str  # Folder, Datacenter, ClusterComputeResource, ComputeResource, HostSystem, ...


def _moid(ref: Any) -> str | None:
    return None if ref is None else str(ref._moId)


def read_inventory(session: Session, kind: str) -> list[Item]:
    """Every VM (templates excluded) or every host of the vCenter."""
    vim, _ = vmomi()

    types = [vim.Folder, vim.Datacenter, vim.ComputeResource, vim.HostSystem]
    props: dict[Any, list[str]] = {
        vim.Folder: ["name", "parent"],
        vim.Datacenter: ["name", "parent"],
        vim.ComputeResource: ["name", "parent"],
        vim.HostSystem: ["name", "parent", *(["customValue"] if kind == "host" else [])],
        vim.CustomFieldsManager: ["field"],
    }
    if kind == "vm":
        types.append(vim.VirtualMachine)
        props[vim.VirtualMachine] = [
            "name",
            "parent",
            "config.template",
            "runtime.host",
            "customValue",
        ]

    def work(content: Any) -> tuple[list[Found], str]:
        view = content.viewManager.CreateContainerView(content.rootFolder, types, True)
        try:
            spec = view_spec(view, props, extra=[content.customFieldsManager])
            return retrieve(content.propertyCollector, [spec]), str(content.rootFolder._moId)
        finally:
            with contextlib.suppress(Exception):
                view.DestroyView()

    found, root = session.call("reading the inventory", work)
    return build_items(found, root, kind)


def build_items(found: list[Found], root: str, kind: str) -> list[Item]:
    """Items from the collector's answer (split out to be testable without vCenter)."""
    nodes: dict[str, _Node] = {}
    field_names: dict[int, str] = {}
    wanted: list[Found] = []
    type_name = TYPE_NAMES[kind]
    for item in found:
        wsdl = type(item.obj).__name__.rsplit(".", 1)[-1]
        if wsdl == "CustomFieldsManager":
            field_names = attributes.field_names(item.get("field"))
            continue
        nodes[item.moid] = _Node(str(item.get("name", "")), _moid(item.get("parent")), wsdl)
        if wsdl == type_name:
            wanted.append(item)

    paths: dict[str, str] = {root: ""}

    def path(moid: str | None) -> str | None:
        if moid is None:
            return None
        chain: list[str] = []
        current: str | None = moid
        while current is not None and current not in paths:
            node = nodes.get(current)
            if node is None or current in chain:
                return None  # outside what was read (a vApp), or a loop
            chain.append(current)
            current = node.parent
        if current is None:
            return None
        base = paths[current]
        for step in reversed(chain):
            base = f"{base}/{nodes[step].name}"
            paths[step] = base
        return base

    def ancestor(moid: str | None, kinds: tuple[str, ...]) -> str | None:
        seen: set[str] = set()
        while moid is not None and moid not in seen:
            seen.add(moid)
            node = nodes.get(moid)
            if node is None:
                return None
            if node.kind in kinds:
                return moid
            moid = node.parent
        return None

    items: list[Item] = []
    for obj in wanted:
        if kind == "vm" and obj.get("config.template"):
            continue
        node = nodes[obj.moid]
        if kind == "vm":
            host = _moid(obj.get("runtime.host"))
            compute = nodes[host].parent if host in nodes else None
        else:
            host = obj.moid
            compute = node.parent
        cluster = (
            compute
            if compute in nodes and nodes[compute].kind == "ClusterComputeResource"
            else None
        )
        datacenter = ancestor(obj.moid, ("Datacenter",)) or ancestor(host, ("Datacenter",))
        own_path = path(obj.moid)
        items.append(
            Item(
                moid=obj.moid,
                name=node.name,
                kind=kind,
                path=own_path or "",
                datacenter=nodes[datacenter].name if datacenter else None,
                cluster=nodes[cluster].name if cluster else None,
                cluster_moid=cluster,
                attributes=attributes.values(obj.get("customValue"), field_names),
            )
        )
    return items


def matches(item: Item, select: VSphereSelect, tagged: set[tuple[str, str]] | None) -> bool:
    """Whether `item` passes every selector `select` gives."""
    if select.datacenter is not None and item.datacenter != select.datacenter:
        return False
    if select.cluster is not None and item.cluster != select.cluster:
        return False
    if select.folder is not None and not item.path.startswith(select.folder + "/"):
        return False
    if select.names and not any(fnmatch.fnmatchcase(item.name, p) for p in select.names):
        return False
    if any(item.attributes.get(k) != v for k, v in select.custom_attribute.items()):
        return False
    return tagged is None or (TYPE_NAMES[item.kind], item.moid) in tagged


def discover(session: Session, tags: Tags, select: VSphereSelect) -> list[Target]:
    """The targets `select` matches, sorted by name (then moid)."""
    items = read_inventory(session, select.kind)
    tagged = tags.tagged(select.tags) if select.tags else None
    chosen = [item for item in items if matches(item, select, tagged)]
    return [item.target() for item in sorted(chosen, key=lambda i: (i.name, i.moid))]
