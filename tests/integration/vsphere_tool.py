"""A site tool for the vSphere tests, run by patchd as `patch.command` (its own process).

    vsphere_tool.py vm URL MOID NAME [--fail NAME ...] [--power-off-on-fail] [--log F] [--sleep S]
                    [--meet S]
    vsphere_tool.py power-off URL MOID
    vsphere_tool.py heartbeat URL MOID COLOR
    vsphere_tool.py host URL MOID NAME [--fail NAME ...] [--log F] [--sleep S] [--meet S]

`vm` stands for a guest patch: it logs start and end, and for a name in --fail exits 3
(after powering the VM off with --power-off-on-fail: a patch that left the guest down).
`power-off` is a patch after which the guest does not come back; `heartbeat` one after
which VMware Tools report that heartbeat (set through vcsim's `SET.*` extraConfig).
`host` checks, while its host should be in maintenance mode, that it is and that no other
host of its cluster is (exit 4 and "VIOLATION" otherwise), twice, --sleep apart. URL is vcsim's
http://user:pass@host:port/sdk.

--meet S (with --log) proves parallelism by a condition, not by timing: the first command
waits, up to S seconds, until another one is running beside it (a `start` without its
`end` in the log) and logs `met`, or `alone` when none came. Once either is logged, later
commands do not wait. Overlapping intervals alone (a 0.2 s sleep in each) did not overlap
on a loaded machine although patchd ran the commands in parallel.
"""

from __future__ import annotations

import argparse
import fcntl
import sys
import time
from typing import Any
from urllib.parse import urlsplit


def connect(url: str) -> Any:
    from pyVim.connect import SmartConnect

    parts = urlsplit(url)
    return SmartConnect(
        host=parts.hostname,
        port=parts.port,
        user=parts.username,
        pwd=parts.password,
        protocol="http",
    )


def log(path: str | None, *words: object) -> None:
    if path:
        with open(path, "a") as out:
            fcntl.flock(out, fcntl.LOCK_EX)
            out.write(" ".join(str(w) for w in words) + "\n")


def meet(path: str | None, seconds: float) -> None:
    """Wait until another command is running beside this one (see --meet)."""
    if not path or seconds <= 0:
        return
    deadline = time.monotonic() + seconds
    while True:
        with open(path) as lines:
            words = [line.split() for line in lines if line.strip()]
        if any(w[0] in ("met", "alone") for w in words):
            return
        running = {w[1] for w in words if w[0] == "start"} - {w[1] for w in words if w[0] == "end"}
        if len(running) >= 2:
            log(path, "met", " ".join(sorted(running)), time.time())
            return
        if time.monotonic() > deadline:
            log(path, "alone", "-", time.time())
            return
        time.sleep(0.05)


def power_off(url: str, moid: str) -> None:
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    si = connect(url)
    WaitForTask(vim.VirtualMachine(moid, si._stub).PowerOffVM_Task())


def set_heartbeat(url: str, moid: str, color: str) -> None:
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    si = connect(url)
    option = vim.option.OptionValue(key="SET.guestHeartbeatStatus", value=color)
    spec = vim.vm.ConfigSpec(extraConfig=[option])
    WaitForTask(vim.VirtualMachine(moid, si._stub).ReconfigVM_Task(spec=spec))


def cluster_state(si: Any, moid: str) -> tuple[bool, list[str]]:
    """(this host in maintenance mode, other hosts of its cluster in maintenance mode)."""
    from pyVmomi import vim, vmodl

    pc = vmodl.query.PropertyCollector
    host = vim.HostSystem(moid, si._stub)
    content = si.content

    def props(obj: Any, kind: Any, paths: list[str]) -> dict[str, Any]:
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=obj)], propSet=[pc.PropertySpec(type=kind, pathSet=paths)]
        )
        result = content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        return {p.name: p.val for p in result.objects[0].propSet}

    me = props(host, vim.HostSystem, ["runtime.inMaintenanceMode", "parent"])
    cluster = me["parent"]
    others = []
    for other in props(cluster, vim.ClusterComputeResource, ["host"])["host"]:
        if other._moId == moid:
            continue
        state = props(other, vim.HostSystem, ["name", "runtime.inMaintenanceMode"])
        if state["runtime.inMaintenanceMode"]:
            others.append(state["name"])
    return bool(me["runtime.inMaintenanceMode"]), others


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["vm", "power-off", "heartbeat", "host"])
    parser.add_argument("url")
    parser.add_argument("moid")
    parser.add_argument("name", nargs="?", default="")
    parser.add_argument("--fail", action="append", default=[])
    parser.add_argument("--power-off-on-fail", action="store_true")
    parser.add_argument("--log")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--meet", type=float, default=0.0)
    args = parser.parse_args()

    if args.action == "power-off":
        power_off(args.url, args.moid)
        print(f"{args.moid}: powered off by the patch")
        return 0

    if args.action == "heartbeat":
        set_heartbeat(args.url, args.moid, args.name)
        print(f"{args.moid}: heartbeat {args.name}")
        return 0

    if args.action == "vm":
        log(args.log, "start", args.name, time.time())
        meet(args.log, args.meet)
        time.sleep(args.sleep)
        failing = args.name in args.fail
        if failing and args.power_off_on_fail:
            power_off(args.url, args.moid)
        log(args.log, "end", args.name, time.time())
        print(f"patching {args.name} ({args.moid}): {'FAILED' if failing else 'ok'}")
        return 3 if failing else 0

    si = connect(args.url)
    log(args.log, "start", args.name, time.time())
    for check in range(2):
        mine, others = cluster_state(si, args.moid)
        if not mine or others:
            print(f"VIOLATION: {args.name} in maintenance mode: {mine}; others: {others}")
            log(args.log, "violation", args.name, time.time())
            return 4
        if check == 0:
            meet(args.log, args.meet)
            time.sleep(args.sleep)
    log(args.log, "end", args.name, time.time())
    print(f"host {args.name}: patched in maintenance mode")
    return 5 if args.name in args.fail else 0


if __name__ == "__main__":
    sys.exit(main())
