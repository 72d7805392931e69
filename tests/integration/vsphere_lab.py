"""Helpers for the vSphere tests: a small vcsim per test, read and changed through pyVmomi.

`Sim` is the test's own view of one simulator (its own session, never the backend's):
it sets up VMs (VMware Tools state through `SET.*` extraConfig, custom attributes, user
snapshots, tags over REST) and reads the real state back for assertions, including the
simulator's SOAP trace (vcsim 0.24.2's revert does not restore a VM's config, so a revert
is proven by the trace and the snapshot tree).
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from patchd.backends.base import Snapshot, Target, Update
from patchd.backends.vsphere import VSphereBackend
from patchd.config.schema import PatchModel
from tests.integration.conftest import VcsimProcess

TOOL = Path(__file__).with_name("vsphere_tool.py")
PC = vmodl.query.PropertyCollector


def start(
    factory: Callable[..., VcsimProcess],
    tmp_path: Path,
    *,
    vms: int = 4,
    clusters: int = 1,
    hosts: int = 1,
    standalone: int = 0,
    trace: bool = False,
    listen: str = "127.0.0.1:0",
    extra: tuple[str, ...] = (),
) -> Sim:
    args = ["-cluster", str(clusters), "-host", str(hosts), "-standalone-host", str(standalone)]
    args += ["-vm", str(vms), "-ds", "1", *extra]
    trace_file = tmp_path / "soap-trace.log"
    if trace:
        args += ["-trace", "-trace-file", str(trace_file)]
    process = factory(*args, listen=listen)
    return Sim(process, trace_file if trace else None)


@dataclass
class Sim:
    process: VcsimProcess
    trace_file: Path | None

    def __post_init__(self) -> None:
        self.si: Any = None
        if self.process.scheme == "http":
            self.si = SmartConnect(
                host=self.process.host,
                port=self.process.port,
                user="user",
                pwd="pass",
                protocol="http",
            )

    def close(self) -> None:
        if self.si is not None:
            Disconnect(self.si)

    # --- the backend's config -----------------------------------------------------------

    def config(self, tmp_path: Path, **changes: Any) -> dict[str, Any]:
        password = tmp_path / "vcenter.password"
        if not password.exists():
            password.write_text("pass\n")
            password.chmod(0o600)  # patchd refuses a secret every user can read
        config: dict[str, Any] = {
            "host": self.process.host,
            "port": self.process.port,
            "protocol": self.process.scheme,
            "insecure": self.process.scheme == "http",
            "username": "user",
            "password_file": str(password),
            "retry_backoff": "0s",
            "retries": 1,
            "timeout": "10s",
        }
        config.update(changes)
        return config

    def backend(self, tmp_path: Path, **changes: Any) -> VSphereBackend:
        return VSphereBackend("vc", self.config(tmp_path, **changes))

    # --- reading ------------------------------------------------------------------------

    @property
    def content(self) -> Any:
        return self.si.content

    def objects(self, kind: Any, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
        content = self.content
        view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
        try:
            spec = PC.FilterSpec(
                objectSet=[
                    PC.ObjectSpec(
                        obj=view,
                        skip=True,
                        selectSet=[
                            PC.TraversalSpec(
                                name="v", path="view", skip=False, type=vim.view.ContainerView
                            )
                        ],
                    )
                ],
                propSet=[PC.PropertySpec(type=kind, pathSet=paths)],
            )
            result = content.propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
            return [
                (o.obj, {p.name: p.val for p in o.propSet})
                for o in (result.objects if result else [])
            ]
        finally:
            view.DestroyView()

    def vms(self) -> dict[str, Any]:
        """name -> VM (templates included), sorted by name."""
        return dict(
            sorted((p["name"], obj) for obj, p in self.objects(vim.VirtualMachine, ["name"]))
        )

    def vm(self, name: str) -> Any:
        return self.vms()[name]

    def hosts(self) -> dict[str, Any]:
        return dict(sorted((p["name"], obj) for obj, p in self.objects(vim.HostSystem, ["name"])))

    def props(self, obj: Any, *paths: str) -> dict[str, Any]:
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=obj)],
            propSet=[PC.PropertySpec(type=type(obj), pathSet=list(paths))],
        )
        result = self.content.propertyCollector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
        return {p.name: p.val for p in result.objects[0].propSet}

    def power(self, name: str) -> str:
        return str(self.props(self.vm(name), "runtime.powerState")["runtime.powerState"])

    def snapshots(self, name: str) -> list[tuple[str, str]]:
        """(name, moid) of every snapshot of a VM."""
        info = self.props(self.vm(name), "snapshot").get("snapshot")
        found: list[tuple[str, str]] = []
        pending = list(info.rootSnapshotList) if info else []
        while pending:
            node = pending.pop(0)
            found.append((node.name, node.snapshot._moId))
            pending.extend(node.childSnapshotList or [])
        return found

    def patchd_snapshots(self) -> list[str]:
        return [
            f"{vm}:{snap}"
            for vm in self.vms()
            for snap, _ in self.snapshots(vm)
            if snap.startswith("patchd-")
        ]

    def attr(self, obj: Any, name: str) -> str | None:
        """A custom attribute, last value wins (vcsim appends on every SetField)."""
        keys = {f.key for f in self.content.customFieldsManager.field if f.name == name}
        value = None
        for item in self.props(obj, "customValue").get("customValue") or []:
            if item.key in keys:
                value = item.value
        return value

    def healthy(self, name: str) -> bool:
        p = self.props(
            self.vm(name), "runtime.powerState", "guest.toolsRunningStatus", "guestHeartbeatStatus"
        )
        return (
            p.get("runtime.powerState") == "poweredOn"
            and p.get("guest.toolsRunningStatus") == "guestToolsRunning"
            and p.get("guestHeartbeatStatus") == "green"
        )

    def in_maintenance(self) -> dict[str, tuple[str, bool]]:
        """host name -> (cluster moid, in maintenance mode)."""
        return {
            p["name"]: (p["parent"]._moId, bool(p["runtime.inMaintenanceMode"]))
            for _, p in self.objects(
                vim.HostSystem, ["name", "parent", "runtime.inMaintenanceMode"]
            )
        }

    def trace(self) -> str:
        assert self.trace_file is not None, "start the simulator with trace=True"
        return self.trace_file.read_text(errors="replace")

    def calls(self, method: str, this: str) -> int:
        """How often the trace shows `method` called on the object `this` (a moid)."""
        text = self.trace()
        count = 0
        for request in text.split("Request: ")[1:]:
            if f"<{method} " in request and f">{this}</_this>" in request:
                count += 1
        return count

    # --- changing -----------------------------------------------------------------------

    def set_tools(
        self, name: str, running: bool = True, heartbeat: str = "green", ip: str = "192.0.2.10"
    ) -> None:
        """VMware Tools' state as vcsim reports it; `ip` is the guest IP (a lab machine's
        address points the VM at that machine)."""
        status = "guestToolsRunning" if running else "guestToolsNotRunning"
        spec = vim.vm.ConfigSpec(
            extraConfig=[
                vim.option.OptionValue(key="SET.guest.toolsRunningStatus", value=status),
                vim.option.OptionValue(key="SET.guestHeartbeatStatus", value=heartbeat),
                vim.option.OptionValue(key="SET.guest.ipAddress", value=ip),
                vim.option.OptionValue(key="SET.guest.hostName", value=f"{name.lower()}.example"),
            ]
        )
        WaitForTask(self.vm(name).ReconfigVM_Task(spec=spec))

    def field(self, name: str, kind: Any) -> int:
        manager = self.content.customFieldsManager
        for f in manager.field:
            if f.name == name and f.managedObjectType in (None, kind):
                return int(f.key)
        return int(manager.AddFieldDefinition(name=name, moType=kind).key)

    def set_attr(self, obj: Any, name: str, value: str) -> None:
        key = self.field(name, type(obj))
        self.content.customFieldsManager.SetField(entity=obj, key=key, value=value)

    def user_snapshot(self, name: str, snapshot: str) -> str:
        WaitForTask(
            self.vm(name).CreateSnapshot_Task(
                name=snapshot, description="", memory=False, quiesce=False
            )
        )
        return dict(self.snapshots(name))[snapshot]

    def power_off(self, name: str) -> None:
        WaitForTask(self.vm(name).PowerOffVM_Task())

    def terminate_sessions(self, keep: str | None = None) -> list[str]:
        """Kill every session but ours (as vCenter does to expired ones)."""
        manager = self.content.sessionManager
        ours = manager.currentSession.key
        others = [s.key for s in manager.sessionList if s.key not in (ours, keep)]
        if others:
            manager.TerminateSession(others)
        return others

    # --- tags over REST -----------------------------------------------------------------

    def rest(self, method: str, path: str, body: Any = None, session: str | None = None) -> Any:
        url = f"http://{self.process.host}:{self.process.port}/rest/com/vmware/cis{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if session is None:
            request.add_header("Authorization", "Basic " + base64.b64encode(b"user:pass").decode())
        else:
            request.add_header("vmware-api-session-id", session)
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw)["value"] if raw.strip() else None

    def tag(self, category: str, tag: str, *names: str) -> None:
        """Create category:tag (if needed) and attach it to the named VMs or hosts."""
        session = self.rest("POST", "/session")
        categories = {
            self.rest("GET", f"/tagging/category/id:{c}", session=session)["name"]: c
            for c in self.rest("GET", "/tagging/category", session=session) or []
        }
        category_id = categories.get(category) or self.rest(
            "POST",
            "/tagging/category",
            {
                "create_spec": {
                    "name": category,
                    "description": "",
                    "cardinality": "MULTIPLE",
                    "associable_types": [],
                }
            },
            session=session,
        )
        tag_id = self.rest(
            "POST",
            "/tagging/tag",
            {"create_spec": {"name": tag, "description": "", "category_id": category_id}},
            session=session,
        )
        everything = {**self.vms(), **self.hosts()}
        for name in names:
            obj = everything[name]
            self.rest(
                "POST",
                f"/tagging/tag-association/id:{tag_id}?~action=attach",
                {"object_id": {"id": obj._moId, "type": type(obj).__name__.split(".")[-1]}},
                session=session,
            )
        self.rest("DELETE", "/session", session=session)


def fleet(sim: Sim, names: list[str], version: str, **attrs: str) -> None:
    """Make VMs patchable: Tools running with a green heartbeat, attributes, a version."""
    for name in names:
        vm = sim.vm(name)
        sim.set_tools(name)
        sim.set_attr(vm, "patchd.patch_version", version)
        for key, value in attrs.items():
            sim.set_attr(vm, key, value)


def tool(*args: str) -> list[str]:
    """A patch.command running tests/integration/vsphere_tool.py."""
    return [sys.executable, str(TOOL), *args]


class WithPatch:
    """Hands the group's PatchModel to the backend's check_update and apply.

    The engine and the contract suite call `check_update(target, pins)` and
    `apply(target, update, snapshot)` until the contract change (which adds `patch`)
    lands; with it they pass `patch` themselves and this passes it through unchanged.
    Everything else goes straight to the real backend.
    """

    def __init__(self, backend: VSphereBackend, patch: Callable[[], PatchModel]) -> None:
        self.real = backend
        self.patch = patch

    def check_update(
        self, target: Target, pins: Mapping[str, str], patch: PatchModel | None = None
    ) -> Update | None:
        return self.real.check_update(target, pins, patch or self.patch())

    def apply(
        self, target: Target, update: Update, snapshot: Snapshot, patch: PatchModel | None = None
    ) -> None:
        self.real.apply(target, update, snapshot, patch or self.patch())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def iter_lines(path: Path) -> Iterator[list[str]]:
    if path.exists():
        for line in path.read_text().splitlines():
            yield line.split()
