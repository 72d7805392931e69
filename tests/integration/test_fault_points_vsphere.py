"""kill -9 at the fault points of a vSphere VM patch, then restart: no snapshot forgotten.

One vcsim (from the test bed) with a VM per fault point; each point has its own config
and state directory. `patchd run --now` crashes at its point (`os._exit`: a kill -9 there),
`patchd run` outside the window then only reconciles (exit 3), and the journal is compared
with the simulator: no `patchd-*` snapshot is left on any VM, the VM is powered on with
VMware Tools running, and the patch-version attribute agrees with the journal (committed:
the new version; rolled back: the old one). A last `patchd run --now` must finish the job.

vcsim's revert does not restore a VM's configuration, so "rolled back" is read from the
version attribute patchd restores and the snapshot tree, not from the guest.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from patchd import faults
from patchd.state import SqliteStore
from tests.conftest import window_at, write_config
from tests.integration.conftest import VcsimProcess
from tests.integration.daemon_helpers import run_patchd
from tests.integration.vsphere_lab import fleet, start, tool

VERSION = "patchd.patch_version"

# A crash before the VM was verified is rolled back; after, it is checked and committed.
HEALTHY_POINTS = {
    "journal.after.snapshotting": "rolled_back",
    "vsphere.after_snapshot_task": "rolled_back",
    "engine.after_snapshot": "rolled_back",
    "journal.after.applying": "rolled_back",
    "engine.after_apply": "rolled_back",
    "engine.during_verify": "rolled_back",
    "journal.after.verified": "committed",
    "journal.after.committing": "committed",
    "vsphere.during_commit": "committed",
    "engine.after_commit": "committed",
    "journal.after.committed": "committed",
}
# The patch command fails for these VMs, so the crash comes during the rollback.
FAILING_POINTS = {
    "journal.after.rolling_back": "rolled_back",
    "vsphere.during_rollback": "rolled_back",
    "engine.after_rollback": "rolled_back",
    "journal.after.rolled_back": "rolled_back",
}


def patchd(
    config: Path, *args: str, crash_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    fault = None if crash_at is None else f"{crash_at}=crash"
    return run_patchd("run", "vms", "-c", str(config), *args, fault=fault, timeout=600)


def test_kill_9_at_every_vsphere_point_then_restart(
    vcsim_factory: Callable[..., VcsimProcess], tmp_path: Path
) -> None:
    points = {**HEALTHY_POINTS, **FAILING_POINTS}
    sim = start(vcsim_factory, tmp_path, vms=len(points))
    try:
        names = list(sim.vms())
        fleet(sim, names, "2026-10")
        cases = dict(zip(points, names, strict=True))
        backend = {
            k: v
            for k, v in sim.config(tmp_path).items()
            if k in ("host", "port", "protocol", "insecure", "username", "password_file", "timeout")
        }
        later = datetime.now(UTC) + timedelta(days=2)  # `run` without --now: refused
        failing = [name for point, name in cases.items() if point in FAILING_POINTS]
        fail_args = [arg for name in failing for arg in ("--fail", name)]
        command = tool("vm", sim.process.url, "{moid}", "{name}", *fail_args)
        files = {}
        for point, name in cases.items():
            path = tmp_path / f"{name}.toml"
            write_config(
                path,
                {
                    "daemon": {"state_dir": tmp_path / name},
                    "windows": {"later": window_at(later)},
                    "backends": {"vc": {"type": "vsphere", **backend}},
                    "groups": {
                        "vms": {
                            "backend": "vc",
                            "window": "later",
                            "select": {"names": [name]},
                            "patch": {"command": command, "version": "2026-11"},
                            "health": {"timeout": "120s", "stable_for": "0s"},
                        }
                    },
                },
            )
            files[point] = path

        def crash(point: str) -> subprocess.CompletedProcess[str]:
            return patchd(files[point], "--now", crash_at=point)

        with ThreadPoolExecutor(4) as pool:
            crashed = dict(zip(points, pool.map(crash, points), strict=True))
        for point, done in crashed.items():
            assert done.returncode == faults.CRASH_EXIT, (point, done.stdout, done.stderr)
        left = sim.patchd_snapshots()
        assert left, "no crash left a snapshot: the points were not reached mid-patch"

        with ThreadPoolExecutor(4) as pool:
            reconciled = dict(
                zip(points, pool.map(lambda p: patchd(files[p]), points), strict=True)
            )
        problems = []
        for point, done in reconciled.items():
            name = cases[point]
            if done.returncode != 3 or "Traceback" in done.stderr:
                problems.append(f"{point}: reconcile exited {done.returncode}: {done.stderr}")
                continue
            store = SqliteStore(tmp_path / name / "patchd.db")
            [run] = store.runs("vms")
            [row] = store.targets(run.id)
            wanted = "2026-11" if row.state == "committed" else "2026-10"
            if row.state != points[point]:
                problems.append(f"{point}: journal says {row.state}, expected {points[point]}")
            if sim.attr(sim.vm(name), VERSION) != wanted:
                problems.append(
                    f"{point}: journal {row.state}, VM says {sim.attr(sim.vm(name), VERSION)}"
                )
            if not sim.healthy(name) or sim.power(name) != "poweredOn":
                problems.append(f"{point}: {name} is not powered on and healthy")
            if run.status != "interrupted" or store.unfinished_targets():
                problems.append(
                    f"{point}: run {run.status}, unfinished {store.unfinished_targets()}"
                )
        assert problems == [], "\n".join(problems)
        assert sim.patchd_snapshots() == []

        with ThreadPoolExecutor(4) as pool:
            finished = dict(
                zip(points, pool.map(lambda p: patchd(files[p], "--now"), points), strict=True)
            )
        for point, done in finished.items():
            name = cases[point]
            assert "Traceback" not in done.stderr, (point, done.stderr)
            final = "2026-10" if point in FAILING_POINTS else "2026-11"
            assert sim.attr(sim.vm(name), VERSION) == final, (point, done.stdout, done.stderr)
            assert SqliteStore(tmp_path / name / "patchd.db").unfinished_targets() == []
        assert sim.patchd_snapshots() == []
    finally:
        sim.close()
