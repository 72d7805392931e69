#!/usr/bin/env python3
"""Figure 3: vSphere inventory discovery against one raw RetrievePropertiesEx.

For each model size (default 5,000 and 20,000 VMs) this script starts its own vcsim from
the test bed's binary (`-dc 1 -cluster 4 -host 2 -standalone-host 0 -vm SIZE/4 -ds 1`:
SIZE VMs spread over 4 clusters), then alternates, --repeat times:

- patchd: `VSphereBackend.discover(VSphereSelect(names=["*"]))` on a backend that has
  already logged in (`ping()`), i.e. the ContainerView, the collector call, the local
  path/cluster/datacenter work, the selectors, Target objects and the sort;
- raw: one `PropertyCollector.RetrievePropertiesEx` through pyVmomi, on its own session,
  over a ContainerView of the same types with the same properties patchd asks for
  (folders, datacenters, compute resources, hosts: name, parent; VMs: name, parent,
  config.template, runtime.host, customValue; the CustomFieldsManager's field),
  including pyVmomi's deserialisation of the answer; the view exists beforehand.

Both run in this process, one after the other, against the same vcsim; the first
repetition of each is not counted (--repeat counts the others), so neither pays for
first-call imports or a cold vcsim.

Figures (medians): patchd / raw per size (target <= 1.3x) and patchd(big) / patchd(small)
(target <= 4.5 for 5k -> 20k, i.e. linear growth; for other sizes 4.5 x (big/small) / 4).

    .venv/bin/python bench/inventory.py [--sizes 5000,20000] [--repeat 3] [--keep-lab]

vcsim takes about a minute to build a 20,000-VM inventory and about 2 GB of memory.
Profile patchd's side with py-spy (discovery runs in the main thread):

    .venv/bin/py-spy record -r 250 -f raw -o inv.raw -- \\
        .venv/bin/python bench/inventory.py --sizes 5000 --repeat 3
    .venv/bin/python bench/pyspy_top.py inv.raw --under VSphereBackend.discover

Prints a header, one figure line per size and the growth line. Exit status 0 if all
targets are met, 1 if not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchlib

CLUSTERS = 4


def raw_session(sim: benchlib.Vcsim) -> tuple[Any, Any, Any]:
    """(si, property collector, filter spec) for the raw call, view already made."""
    from pyVim.connect import SmartConnect
    from pyVmomi import vim, vmodl

    si = SmartConnect(host=sim.host, port=sim.port, user="user", pwd="pass", protocol="http")
    content = si.RetrieveContent()
    types = [vim.Folder, vim.Datacenter, vim.ComputeResource, vim.HostSystem, vim.VirtualMachine]
    view = content.viewManager.CreateContainerView(content.rootFolder, types, True)
    pc = vmodl.query.PropertyCollector
    props = {
        vim.Folder: ["name", "parent"],
        vim.Datacenter: ["name", "parent"],
        vim.ComputeResource: ["name", "parent"],
        vim.HostSystem: ["name", "parent"],
        vim.CustomFieldsManager: ["field"],
        vim.VirtualMachine: ["name", "parent", "config.template", "runtime.host", "customValue"],
    }
    spec = pc.FilterSpec(
        objectSet=[
            pc.ObjectSpec(
                obj=view,
                skip=True,
                selectSet=[pc.TraversalSpec(name="view", path="view", skip=False, type=type(view))],
            ),
            pc.ObjectSpec(obj=content.customFieldsManager, skip=False),
        ],
        propSet=[pc.PropertySpec(type=k, pathSet=v) for k, v in props.items()],
    )
    return si, content.propertyCollector, spec


def measure(sim: benchlib.Vcsim, size: int, repeat: int) -> dict[str, Any]:
    from pyVim.connect import Disconnect
    from pyVmomi import vmodl

    from patchd.backends.vsphere import VSphereBackend, VSphereSelect

    password = sim.workdir / "password"
    password.write_text("pass\n")
    password.chmod(0o600)  # patchd refuses a secret every user can read
    backend = VSphereBackend(
        "bench",
        {
            "host": sim.host,
            "port": sim.port,
            "protocol": "http",
            "insecure": True,
            "username": "user",
            "password_file": str(password),
            "timeout": "300s",
        },
    )
    backend.ping()
    select = VSphereSelect(names=["*"])
    si, collector, spec = raw_session(sim)
    options = vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=1000)
    patchd_times: list[float] = []
    raw_times: list[float] = []
    found = objects = 0
    try:
        for i in range(repeat + 1):  # the first round warms up both sides
            t0 = time.perf_counter()
            result = collector.RetrievePropertiesEx([spec], options)
            raw = time.perf_counter() - t0
            objects = len(result.objects)
            assert not getattr(result, "token", None), "paged answer: raw would need more calls"
            del result
            t0 = time.perf_counter()
            targets = backend.discover(select)
            mine = time.perf_counter() - t0
            found = len(targets)
            del targets
            if i:
                raw_times.append(raw)
                patchd_times.append(mine)
    finally:
        Disconnect(si)
        backend.close()
    if found != size:
        raise SystemExit(f"bench: discovery found {found} VMs, expected {size}")
    return {
        "patchd": statistics.median(patchd_times),
        "raw": statistics.median(raw_times),
        "patchd_all": patchd_times,
        "raw_all": raw_times,
        "objects": objects,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--repeat", type=int, default=3, help="counted rounds per size")
    parser.add_argument("--keep-lab", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[int, dict[str, Any]] = {}
    with benchlib.lab(keep=args.keep_lab) as env:
        binary = env["PATCHD_LAB_VCSIM_BIN"]
        for size in sizes:
            per_pool = max(1, size // CLUSTERS)
            flags = ["-dc", "1", "-cluster", str(CLUSTERS), "-host", "2", "-standalone-host", "0"]
            flags += ["-vm", str(per_pool), "-pool", "0", "-ds", "1"]
            # vcsim builds its inventory before it listens: minutes for 20,000 VMs.
            with benchlib.vcsim(binary, *flags, timeout=max(300.0, size / 10)) as sim:
                benchlib.note(
                    f"bench: vcsim with {per_pool * CLUSTERS} VMs up in {sim.started_in:.1f} s, "
                    f"RSS {sim.rss_mb():.0f} MB"
                )
                r = measure(sim, per_pool * CLUSTERS, args.repeat)
                r["vcsim_start"] = sim.started_in
                results[size] = r
    met = True
    benchlib.say(
        f"inventory: patchd VSphereBackend.discover vs one raw RetrievePropertiesEx (pyVmomi),"
        f" same properties, own vcsim per size ({CLUSTERS} clusters), median of {args.repeat}"
    )
    for size in sizes:
        r = results[size]
        ratio = r["patchd"] / r["raw"]
        ok = ratio <= 1.3
        met = met and ok
        benchlib.say(
            benchlib.ratio_line(
                f"inventory[{size} VMs]: patchd/raw",
                ratio,
                "<= 1.3x",
                ok,
                f"patchd {r['patchd'] * 1000:.0f} ms, raw {r['raw'] * 1000:.0f} ms "
                f"({r['objects']} objects); patchd runs "
                + ", ".join(f"{t * 1000:.0f}" for t in r["patchd_all"])
                + " ms; raw runs "
                + ", ".join(f"{t * 1000:.0f}" for t in r["raw_all"])
                + " ms",
            )
        )
    if len(sizes) == 2:
        small, big = sizes
        growth = results[big]["patchd"] / results[small]["patchd"]
        raw_growth = results[big]["raw"] / results[small]["raw"]
        ok = growth <= 4.5 * (big / small) / 4
        met = met and ok
        benchlib.say(
            benchlib.ratio_line(
                f"inventory: patchd {big}/{small} growth",
                growth,
                f"<= {4.5 * (big / small) / 4:g}",
                ok,
                f"raw grows {raw_growth:.2f}x for {big / small:g}x the VMs, so patchd's"
                f" growth is {growth / raw_growth:.2f}x the raw call's (vcsim's own growth"
                " is in both)",
            )
        )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
