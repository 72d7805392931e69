"""The vSphere backend against real simulators (vcsim from the test bed), through the engine.

Every test starts its own small vcsim (a few VMs or hosts) and reads the real state back
through its own pyVmomi session (`vsphere_lab.Sim`). Patch commands are real processes
(`vsphere_tool.py`). What vcsim 0.24.2 cannot do is said where it matters: its revert does
not restore a VM's configuration (so reverts are checked in the SOAP trace and the
snapshot tree), it has no RebootGuest (the backend's power-cycle fallback is checked), and
it never pages a collector result (the continuation-token loop is unit-tested with a stub
collector in tests/unit/test_vsphere_units.py).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from pyVim.task import WaitForTask

import patchd.log
from patchd.backends.base import (
    BackendError,
    LeftOutOfService,
    NotRunning,
    Snapshot,
    StepFailed,
    TransientError,
)
from patchd.backends.vsphere import LoginFailed, VSphereBackend, VSphereSelect
from patchd.config import load_settings
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel
from patchd.config.settings import Group
from patchd.config.types import Limit
from patchd.engine import NullObserver, RunRequest, RunResult, run_group
from patchd.reports import plan
from patchd.state import SqliteStore, Store
from tests.conftest import write_config
from tests.integration.conftest import VcsimProcess
from tests.integration.vsphere_lab import Sim, WithPatch, fleet, iter_lines, start, tool

Factory = Callable[..., VcsimProcess]
HEALTH = HealthModel(timeout="120s", stable_for="0s")  # a limit: healthy VMs pass at once
_runs = itertools.count()


# --- helpers --------------------------------------------------------------------------


@pytest.fixture
def sims(vcsim_factory: Factory, tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    started: list[Sim] = []

    def make(**kw: Any) -> Sim:
        sim = start(vcsim_factory, tmp_path, **kw)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.close()


@pytest.fixture
def backends() -> Iterator[list[VSphereBackend]]:
    made: list[VSphereBackend] = []
    yield made
    for backend in made:
        backend.close()


def make_backend(sim: Sim, tmp_path: Path, made: list[VSphereBackend], **kw: Any) -> VSphereBackend:
    backend = sim.backend(tmp_path, **kw)
    made.append(backend)
    return backend


def group(select: VSphereSelect, patch: PatchModel, **changes: Any) -> Group:
    fields: dict[str, Any] = {
        "name": "g",
        "backend": "vc",
        "window": "w",
        "select": select,
        "after": None,
        "soak": timedelta(0),
        "max_concurrency": Limit(count=1),
        "max_errors": Limit(count=1),
        "snapshot": SnapshotModel(),
        "health": HEALTH,
        "patch": patch,
    }
    fields.update(changes)
    return Group(**fields)


def run(backend: VSphereBackend, grp: Group, store: Store, **kw: Any) -> RunResult:
    return run_group(
        RunRequest(
            run_id=f"t{next(_runs)}-{uuid.uuid4().hex[:6]}",
            group=grp,
            backend=WithPatch(backend, lambda: grp.patch),  # type: ignore[arg-type]
            store=store,
            clock=lambda: datetime.now(UTC),
            may_start=lambda now: True,
            observer=NullObserver(),
            **kw,
        )
    )


def max_overlap(log: Path) -> int:
    """The most patch commands that were running at the same moment (from their log)."""
    events = sorted(
        (float(words[2]), 1 if words[0] == "start" else -1)
        for words in iter_lines(log)
        if words[0] in ("start", "end")
    )
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


# --- VMs through the engine -----------------------------------------------------------


def test_vm_group_by_custom_attribute_in_batches_and_a_failed_patch_reverted(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=6, trace=True)
    names = list(sim.vms())
    wave, outside = names[:5], names[5]
    fleet(sim, wave, "2026-10", wave="1")
    fleet(sim, [outside], "2026-10", wave="2")
    bad = wave[2]
    bad_moid = sim.vm(bad)._moId
    user_snapshot = sim.user_snapshot(bad, "before-upgrade")
    log = tmp_path / "patch.log"
    patch = PatchModel(
        command=tool(
            "vm", sim.process.url, "{moid}", "{name}", "--fail", bad, "--power-off-on-fail",
            "--log", str(log), "--sleep", "0.3", "--meet", "60",
        ),
        version="2026-11",
    )  # fmt: skip
    backend = make_backend(sim, tmp_path, backends)
    store = SqliteStore(tmp_path / "state.db")
    grp = group(
        VSphereSelect(custom_attribute={"wave": "1"}),
        patch,
        max_concurrency=Limit(count=2),
        max_errors=Limit(count=2),
    )
    result = run(backend, grp, store)

    assert result.status == "completed"
    outcomes = {o.target.name: o for o in result.outcomes}
    assert sorted(outcomes) == wave
    assert outcomes[bad].result == "rolled_back"
    assert "exited 3" in (outcomes[bad].error or "")
    assert {n: o.result for n, o in outcomes.items() if n != bad} == dict.fromkeys(
        [n for n in wave if n != bad], "success"
    )
    assert max_overlap(log) <= 2  # batches of max_concurrency, never more
    assert "met" in {words[0] for words in iter_lines(log)}  # and two did run at once

    for name in wave:
        if name == bad:
            continue
        assert sim.attr(sim.vm(name), "patchd.patch_version") == "2026-11"
        assert sim.snapshots(name) == []
        assert sim.healthy(name)

    # The failed VM: reverted to its patchd snapshot (the trace shows it: vcsim's revert
    # does not restore config), powered on again, that snapshot removed, the user's kept.
    row = next(r for r in store.targets(result.run_id) if r.name == bad)
    assert row.state == "rolled_back"
    assert row.snapshot is not None
    moref = row.snapshot["moref"]
    assert sim.calls("RevertToSnapshot_Task", moref) == 1
    assert sim.calls("RemoveSnapshot_Task", moref) == 1
    assert sim.calls("PowerOffVM_Task", bad_moid) == 1  # by the failing patch
    assert sim.calls("PowerOnVM_Task", bad_moid) == 1  # by the rollback
    assert sim.calls("RevertToSnapshot_Task", user_snapshot) == 0
    assert sim.calls("RemoveSnapshot_Task", user_snapshot) == 0
    assert sim.snapshots(bad) == [("before-upgrade", user_snapshot)]
    assert sim.power(bad) == "poweredOn"
    assert sim.attr(sim.vm(bad), "patchd.patch_version") == "2026-10"
    assert [s for s, _, _ in store.journal(result.run_id, bad_moid)] == [
        "snapshot", "snapshot", "apply", "rollback", "rollback",
    ]  # fmt: skip

    # The VM outside the selection was not touched.
    assert sim.snapshots(outside) == []
    assert sim.attr(sim.vm(outside), "patchd.patch_version") == "2026-10"

    # A second run patches only the reverted VM (the others are current).
    fixed = PatchModel(command=tool("vm", sim.process.url, "{moid}", "{name}"), version="2026-11")
    again = run(backend, group(VSphereSelect(custom_attribute={"wave": "1"}), fixed), store)
    assert {o.target.name: o.result for o in again.outcomes} == {
        n: ("success" if n == bad else "current") for n in wave
    }
    assert sim.patchd_snapshots() == []


def test_snapshot_kept_for_keep_then_released_by_a_new_process(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=2)
    [name, _] = list(sim.vms())
    fleet(sim, [name], "1", role="db")
    backend = make_backend(sim, tmp_path, backends)
    store = SqliteStore(tmp_path / "state.db")
    ok = [sys.executable, "-c", "pass"]
    grp = group(
        VSphereSelect(names=[name]),
        PatchModel(command=ok, version="2"),
        snapshot=SnapshotModel(keep="24h", memory=True),
    )
    before = datetime.now(UTC)
    result = run(backend, grp, store)
    [outcome] = result.outcomes
    assert outcome.result == "success"
    retained = outcome.retained
    assert retained is not None and retained.keep == timedelta(hours=24)
    kept = f"patchd-{result.run_id}"
    assert [s for s, _ in sim.snapshots(name)] == [kept]
    assert sim.attr(sim.vm(name), "patchd.kept_snapshots") == kept

    listed = backend.patchd_snapshots()
    assert [(s.vm_name, s.name, s.kept) for s in listed] == [(name, kept, True)]
    age = backend.oldest_patchd_snapshot_age(datetime.now(UTC) + timedelta(hours=1))
    assert (
        age is not None and 3600 <= age <= 3600 + (datetime.now(UTC) - before).total_seconds() + 1
    )

    # A kept snapshot is not a leftover: the next patch level goes ahead.
    target = backend.discover(VSphereSelect(names=[name]))[0]
    update = backend.check_update(target, {}, PatchModel(command=ok, version="3"))
    assert update is not None and (update.current, update.available) == ("2", "3")

    # Expired: released by another backend instance (patchd restarted meanwhile), twice.
    later = make_backend(sim, tmp_path, backends)
    later.release(retained.data)
    later.release(retained.data)
    assert sim.snapshots(name) == []
    assert sim.attr(sim.vm(name), "patchd.kept_snapshots") == ""
    assert later.oldest_patchd_snapshot_age(datetime.now(UTC)) is None


def test_leftover_snapshot_of_a_crashed_run_blocks_until_rolled_back_from_the_journal(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=1)
    [name] = list(sim.vms())
    fleet(sim, [name], "1")
    patch = PatchModel(command=[sys.executable, "-c", "pass"], version="2")
    crashed = make_backend(sim, tmp_path, backends)
    target = crashed.discover(VSphereSelect(names=[name]))[0]
    planned = crashed.plan_snapshot(target, "crashed-run")
    crashed.snapshot(target, planned, SnapshotModel())  # ... and patchd dies here

    restarted = make_backend(sim, tmp_path, backends)
    with pytest.raises(StepFailed, match="patchd-crashed-run left by an unfinished"):
        restarted.check_update(target, {}, patch)
    # What the journal holds for it is the planned snapshot (written before the side
    # effect); rolling back from that alone finds the snapshot by name.
    restarted.rollback(target, Snapshot(target.id, dict(planned.data)))
    assert sim.snapshots(name) == []
    assert restarted.check_update(target, {}, patch) is not None


def test_rollback_that_cannot_bring_the_vm_back_fails_and_keeps_the_snapshot(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    """vcsim's revert does not restore config, so a patch that turned the heartbeat red
    leaves it red after the revert: a VM that does not come back. (A real revert would
    bring back the guest; the point here is what patchd does when it does not.)"""
    sim = sims(vms=1, trace=True)
    [name] = list(sim.vms())
    fleet(sim, [name], "1")
    patch = PatchModel(command=tool("heartbeat", sim.process.url, "{moid}", "red"), version="2")
    backend = make_backend(sim, tmp_path, backends, rollback_timeout="1s")
    store = SqliteStore(tmp_path / "s.db")
    health = HealthModel(timeout="1s", stable_for="0s")
    result = run(backend, group(VSphereSelect(names=[name]), patch, health=health), store)
    [outcome] = result.outcomes
    assert outcome.result == "rollback_failed"
    assert "did not report it healthy" in (outcome.error or "")
    snapshot = f"patchd-{result.run_id}"
    assert f"snapshot {snapshot} is kept" in (outcome.error or "")
    moref = dict(sim.snapshots(name))[snapshot]
    assert sim.calls("RevertToSnapshot_Task", moref) == 1
    assert sim.calls("RemoveSnapshot_Task", moref) == 0

    # Until a person looks, the VM is not patched again ...
    [target] = backend.discover(VSphereSelect(names=[name]))
    with pytest.raises(StepFailed, match="left by an unfinished"):
        backend.check_update(target, {}, patch)
    # ... then the journal's rollback (idempotent) finishes the job.
    sim.set_tools(name)
    [row] = store.targets(result.run_id)
    assert row.snapshot is not None
    backend.rollback(target, Snapshot(target.id, row.snapshot))
    assert sim.snapshots(name) == []
    assert sim.attr(sim.vm(name), "patchd.patch_version") == "1"


def test_verify_reads_tools_and_heartbeat(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=1)
    [name] = list(sim.vms())
    fleet(sim, [name], "1")
    backend = make_backend(sim, tmp_path, backends)
    target = backend.discover(VSphereSelect(names=[name]))[0]
    update = backend.check_update(target, {}, PatchModel(command=["true"], version="2"))
    assert update is not None
    backend.verify(target, update, HealthModel(timeout="120s", stable_for="1s"))  # a limit

    sim.set_tools(name, heartbeat="red")
    started = time.monotonic()
    with pytest.raises(StepFailed, match="heartbeat red"):
        backend.verify(target, update, HealthModel(timeout="1s", stable_for="0s"))
    assert time.monotonic() - started >= 0.9  # it waited its timeout for the heartbeat

    sim.set_tools(name)
    sim.power_off(name)
    started = time.monotonic()
    with pytest.raises(StepFailed, match="poweredOff"):
        backend.verify(target, update, HealthModel(timeout="600s"))
    assert time.monotonic() - started < 300  # a powered-off VM fails, not its timeout

    # And the pre-check refuses a powered-off VM before anything is changed: NotRunning,
    # which the engine counts as skipped, not failed.
    with pytest.raises(NotRunning, match="powered-on VMs only"):
        backend.check_update(target, {}, PatchModel(command=["true"], version="2"))


def test_patch_command_placeholders_environment_and_reboot_fallback(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=1, trace=True)
    [name] = list(sim.vms())
    fleet(sim, [name], "1")
    moid = sim.vm(name)._moId
    out = tmp_path / "argv.json"
    script = (
        "import json, os, sys; json.dump({'argv': sys.argv[1:],"
        " 'version': os.environ['PATCHD_PATCH_VERSION'], 'ip': os.environ['PATCHD_TARGET_IP']},"
        f" open({str(out)!r}, 'w'))"
    )
    patch = PatchModel(
        command=[sys.executable, "-c", script, "{name}", "{moid}", "{uuid}", "{ip}", "{hostname}",
                 '{"keep": "{braces}"}', "x{name}y"],
        version="2",
        reboot=True,
    )  # fmt: skip
    backend = make_backend(sim, tmp_path, backends)
    boot_before = sim.props(sim.vm(name), "summary.runtime.bootTime")["summary.runtime.bootTime"]
    result = run(backend, group(VSphereSelect(names=[name]), patch), SqliteStore(tmp_path / "s.db"))
    assert [o.result for o in result.outcomes] == ["success"], result.outcomes[0].error
    got = json.loads(out.read_text())
    uuid_ = sim.props(sim.vm(name), "config.uuid")["config.uuid"]
    assert got["argv"] == [
        name, moid, uuid_, "192.0.2.10", f"{name.lower()}.example", '{"keep": "{braces}"}',
        f"x{name}y",
    ]  # fmt: skip
    assert (got["version"], got["ip"]) == ("2", "192.0.2.10")
    # patch.reboot with Tools running asks the guest first; vcsim has no RebootGuest, so
    # the backend falls back to a power cycle (ResetVM_Task), which gives a new boot time.
    assert sim.calls("RebootGuest", moid) == 1
    assert sim.calls("ResetVM_Task", moid) == 1
    boot_after = sim.props(sim.vm(name), "summary.runtime.bootTime")["summary.runtime.bootTime"]
    assert boot_after != boot_before


def test_without_a_version_every_run_patches_and_pins_override(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=1)
    [name] = list(sim.vms())
    fleet(sim, [name], "2026-10")
    backend = make_backend(sim, tmp_path, backends)
    store = SqliteStore(tmp_path / "s.db")
    unversioned = PatchModel(command=[sys.executable, "-c", "pass"])
    for _ in range(2):
        result = run(backend, group(VSphereSelect(names=[name]), unversioned), store)
        [outcome] = result.outcomes
        assert outcome.result == "success"
        assert outcome.update is not None
        assert (outcome.update.current, outcome.update.available) == ("2026-10", "unversioned")
    assert sim.attr(sim.vm(name), "patchd.patch_version") == "2026-10"  # nothing recorded

    target = backend.discover(VSphereSelect(names=[name]))[0]
    versioned = PatchModel(command=["true"], version="2026-12")
    assert backend.check_update(target, {"patch": "2026-10"}, versioned) is None
    pinned = backend.check_update(target, {"patch": "2026-11"}, versioned)
    assert pinned is not None and pinned.available == "2026-11"
    with pytest.raises(StepFailed, match=r"neither patch\.command nor patch\.reboot"):
        backend.check_update(target, {}, PatchModel(version="2026-12"))


# --- ESXi hosts through the engine ------------------------------------------------------


class Watcher(threading.Thread):
    """Polls every host's maintenance mode through its own session while a run goes."""

    def __init__(self, sim: Sim) -> None:
        super().__init__(daemon=True)
        self.sim = sim
        self.stop = threading.Event()
        self.most: dict[str, int] = {}
        self.seen: set[str] = set()
        self.polls = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        view = Sim(self.sim.process, None)  # its own session
        try:
            while not self.stop.is_set():
                by_cluster: dict[str, int] = {}
                for host, (cluster, in_mm) in view.in_maintenance().items():
                    if in_mm:
                        self.seen.add(host)
                        by_cluster[cluster] = by_cluster.get(cluster, 0) + 1
                for cluster, count in by_cluster.items():
                    self.most[cluster] = max(self.most.get(cluster, 0), count)
                self.polls += 1
                time.sleep(0.02)
        except BaseException as err:
            self.error = err
        finally:
            view.close()


def test_hosts_roll_per_cluster_never_two_in_maintenance_mode(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=0, clusters=2, hosts=3)
    hosts = sorted(sim.hosts())
    assert len(hosts) == 6
    log = tmp_path / "hosts.log"
    patch = PatchModel(
        command=tool(
            "host",
            sim.process.url,
            "{moid}",
            "{name}",
            "--sleep",
            "0.2",
            "--log",
            str(log),
            "--meet",
            "60",
        ),
        version="8.0u3",
    )
    backend = make_backend(sim, tmp_path, backends)
    watcher = Watcher(sim)
    watcher.start()
    try:
        result = run(
            backend,
            group(VSphereSelect(kind="host", datacenter="DC0"), patch),
            SqliteStore(tmp_path / "s.db"),
        )
    finally:
        watcher.stop.set()
        watcher.join()
    assert watcher.error is None
    assert result.status == "completed", [o.error for o in result.outcomes]
    assert {o.target.name: o.result for o in result.outcomes} == dict.fromkeys(hosts, "success")
    # Asserted while it ran: each command checked its own cluster (exit 4 otherwise), and
    # the watcher saw every host in maintenance mode, never two of one cluster at once.
    assert watcher.seen == set(hosts)
    assert set(watcher.most.values()) == {1} and len(watcher.most) == 2
    assert not any(words[0] == "violation" for words in iter_lines(log))
    # The two clusters rolled in parallel: a host of each was patched at once.
    assert "met" in {words[0] for words in iter_lines(log)}, list(iter_lines(log))
    assert not any(in_mm for _, in_mm in sim.in_maintenance().values())
    assert {sim.attr(h, "patchd.patch_version") for h in sim.hosts().values()} == {"8.0u3"}


def test_failed_host_stays_in_maintenance_mode_and_halts_its_cluster(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=0, clusters=2, hosts=2)
    hosts = sorted(sim.hosts())  # DC0_C0_H0, DC0_C0_H1, DC0_C1_H0, DC0_C1_H1
    broken = "DC0_C0_H0"
    patch = PatchModel(
        command=tool("host", sim.process.url, "{moid}", "{name}", "--fail", broken), version="2"
    )
    backend = make_backend(sim, tmp_path, backends)
    store = SqliteStore(tmp_path / "s.db")
    grp = group(VSphereSelect(kind="host", names=["DC0_C*"]), patch, max_errors=Limit(count=10))
    result = run(backend, grp, store)
    outcomes = {o.target.name: o for o in result.outcomes}
    # Left in maintenance mode, nothing rolled back: reported so (issue 15).
    assert outcomes[broken].result == "out_of_service"
    assert "left in maintenance mode" in (outcomes[broken].error or "")
    assert "exited 5" in (outcomes[broken].error or "")
    # Never started: its cluster is halted, which is not its failure (issue 15).
    assert outcomes["DC0_C0_H1"].result == "pending"
    assert "DC0_C0_H0 of its cluster is in maintenance mode" in (outcomes["DC0_C0_H1"].error or "")
    assert outcomes["DC0_C1_H0"].result == outcomes["DC0_C1_H1"].result == "success"
    state = sim.in_maintenance()
    assert state[broken][1] is True  # out of service, never returned broken
    assert [h for h in hosts if state[h][1]] == [broken]
    assert sim.attr(sim.hosts()[broken], "patchd.patch_version") is None

    # The plan (check_update) says why, without changing anything.
    targets = {t.name: t for t in backend.discover(grp.select)}
    with pytest.raises(StepFailed, match="maintenance mode already"):
        backend.check_update(targets[broken], {}, patch)

    # A person fixes the host and takes it out of maintenance mode: the cluster goes on.
    WaitForTask(sim.hosts()[broken].ExitMaintenanceMode_Task(timeout=0))
    fixed = PatchModel(command=tool("host", sim.process.url, "{moid}", "{name}"), version="2")
    again = run(backend, group(grp.select, fixed), store)
    assert {o.target.name: o.result for o in again.outcomes} == {
        broken: "success", "DC0_C0_H1": "success", "DC0_C1_H0": "current", "DC0_C1_H1": "current",
    }  # fmt: skip


def test_host_rollback_takes_a_host_that_failed_its_check_out_of_service(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=0, clusters=1, hosts=2)
    backend = make_backend(sim, tmp_path, backends)
    patch = PatchModel(command=[sys.executable, "-c", "pass"], version="2")
    first, second = backend.discover(VSphereSelect(kind="host", cluster="DC0_C0"))

    # Planned only, or recorded and never patched: nothing to do, the host stays in service.
    backend.rollback(first, backend.plan_snapshot(first, "r1"))
    taken = backend.snapshot(first, backend.plan_snapshot(first, "r1"), SnapshotModel())
    backend.rollback(first, taken)
    assert not sim.in_maintenance()[first.name][1]

    # Patched and back in service, then the health probe (run by the engine after verify)
    # fails: the rollback puts the host back into maintenance mode, out of service.
    update = backend.check_update(first, {}, patch)
    assert update is not None
    taken = backend.snapshot(first, backend.plan_snapshot(first, "r2"), SnapshotModel())
    backend.apply(first, update, taken, patch)
    backend.verify(first, update, HEALTH)
    assert not sim.in_maintenance()[first.name][1]
    with pytest.raises(LeftOutOfService, match="left in maintenance mode"):
        backend.rollback(first, taken)
    with pytest.raises(LeftOutOfService):
        backend.rollback(first, taken)  # idempotent
    assert sim.in_maintenance()[first.name][1]
    assert sim.attr(sim.hosts()[first.name], "patchd.patch_version") is None
    # ... and the other host of its cluster is not patched while it is out.
    with pytest.raises(StepFailed, match="patching of this cluster is halted"):
        backend.check_update(second, {}, patch)


# --- selection -------------------------------------------------------------------------


def test_selectors(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=2, clusters=1, hosts=2, standalone=1, extra=("-dc", "2"))
    vms = sim.vms()
    content = sim.content
    # A folder /DC0/vm/prod/web holding one VM; a template (never a target).
    dc0 = next(d for d in content.rootFolder.childEntity if d.name == "DC0")
    web = dc0.vmFolder.CreateFolder("prod").CreateFolder("web")
    WaitForTask(web.MoveIntoFolder_Task([vms["DC0_C0_RP0_VM1"]]))
    sim.power_off("DC0_H0_VM1")
    vms["DC0_H0_VM1"].MarkAsTemplate()
    sim.set_attr(vms["DC0_C0_RP0_VM0"], "team", "web")
    sim.set_attr(vms["DC1_C0_RP0_VM0"], "team", "web")
    sim.set_attr(vms["DC1_C0_RP0_VM0"], "team", "db")  # appended: the last value wins
    sim.set_attr(vms["DC0_H0_VM1"], "team", "web")  # a template
    sim.set_attr(vms["DC0_H0_VM0"], "patchd.depends_on", "DC0_C0_RP0_VM0, DC1_H0_VM0")
    sim.tag("wave", "1", "DC0_C0_RP0_VM0", "DC1_H0_VM0", "DC0_H0_VM1", "DC1_C0_H0")
    sim.tag("env", "prod", "DC0_C0_RP0_VM0", "DC1_C0_RP0_VM1")
    sim.tag("other", "1", "DC1_C0_RP0_VM1")

    backend = make_backend(sim, tmp_path, backends)

    def names(**select: Any) -> list[str]:
        return [t.name for t in backend.discover(VSphereSelect(**select))]

    assert names(datacenter="DC1") == [
        "DC1_C0_RP0_VM0",
        "DC1_C0_RP0_VM1",
        "DC1_H0_VM0",
        "DC1_H0_VM1",
    ]
    assert names(cluster="DC0_C0") == ["DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"]
    assert names(folder="/DC0/vm/prod") == ["DC0_C0_RP0_VM1"]
    assert names(folder="/DC0/vm/prod/web/") == ["DC0_C0_RP0_VM1"]
    assert names(folder="/DC0/vm/pro") == []
    assert names(names=["DC0_H0_*"]) == ["DC0_H0_VM0"]  # DC0_H0_VM1 is a template
    assert names(names=["*_VM1", "DC1_H0_VM0"]) == [
        "DC0_C0_RP0_VM1", "DC1_C0_RP0_VM1", "DC1_H0_VM0", "DC1_H0_VM1",
    ]  # fmt: skip
    assert names(custom_attribute={"team": "web"}) == ["DC0_C0_RP0_VM0"]
    assert names(custom_attribute={"team": "db"}) == ["DC1_C0_RP0_VM0"]
    assert names(tags=["wave:1"]) == ["DC0_C0_RP0_VM0", "DC1_H0_VM0"]
    assert names(tags=["1"]) == ["DC0_C0_RP0_VM0", "DC1_C0_RP0_VM1", "DC1_H0_VM0"]
    assert names(tags=["wave:1", "env:prod"]) == ["DC0_C0_RP0_VM0"]
    assert names(tags=["1"], datacenter="DC1", cluster="DC1_C0") == ["DC1_C0_RP0_VM1"]
    assert names(kind="host", tags=["wave:1"]) == ["DC1_C0_H0"]
    assert names(kind="host", datacenter="DC0") == ["DC0_C0_H0", "DC0_C0_H1", "DC0_H0"]
    with pytest.raises(BackendError, match="no vSphere tag 'wave:2' exists"):
        names(tags=["wave:2"])

    by_name = {t.name: t for t in backend.discover(VSphereSelect(datacenter="DC0"))}
    assert by_name["DC0_H0_VM0"].depends_on == ("DC0_C0_RP0_VM0", "DC1_H0_VM0")
    assert by_name["DC0_C0_RP0_VM0"].labels["team"] == "web"
    assert by_name["DC0_C0_RP0_VM0"].kind == "vm" and by_name["DC0_C0_RP0_VM0"].partition is None
    hosts = {t.name: t for t in backend.discover(VSphereSelect(kind="host", datacenter="DC0"))}
    assert hosts["DC0_C0_H0"].partition == hosts["DC0_C0_H1"].partition
    assert hosts["DC0_C0_H0"].partition is not None and hosts["DC0_H0"].partition is None

    # One discovery: a view, one RetrievePropertiesEx, and no per-object reads.
    before = backend.session.logins
    assert before == 1
    facts = backend.describe(by_name["DC0_C0_RP0_VM0"])
    assert facts["name"] == "DC0_C0_RP0_VM0" and all(isinstance(v, str) for v in facts.values())


# --- the session ------------------------------------------------------------------------


def test_logs_in_again_after_the_session_is_killed(
    sims: Callable[..., Sim], tmp_path: Path, backends: list[VSphereBackend]
) -> None:
    sim = sims(vms=2)
    sim.tag("wave", "1", *sim.vms())
    backend = make_backend(sim, tmp_path, backends)
    backend.ping()
    assert len(backend.discover(VSphereSelect(tags=["wave:1"]))) == 2
    assert backend.session.logins == 1

    assert len(sim.terminate_sessions()) == 1  # vCenter expired or killed our session
    assert len(backend.discover(VSphereSelect(names=["*"]))) == 2
    assert backend.session.logins == 2
    backend.ping()
    assert backend.session.logins == 2

    # The REST session too: a 401 logs in again once.
    backend.tags._id = "expired-session-id"
    assert len(backend.discover(VSphereSelect(tags=["wave:1"]))) == 2

    # Logout on close; a closed backend logs in again when used.
    backend.close()
    assert sim.content.sessionManager.sessionList is not None
    assert len([s for s in sim.content.sessionManager.sessionList]) == 1  # only the test's
    backend.ping()
    assert backend.session.logins == 3


def test_unreachable_vcenter_is_transient(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text("pass")
    password.chmod(0o600)  # patchd refuses a secret every user can read
    backend = VSphereBackend(
        "vc",
        {
            "host": "127.0.0.1", "port": 9, "protocol": "http", "insecure": True,
            "username": "u", "password_file": str(password), "retries": 1, "retry_backoff": "0s",
        },
    )  # fmt: skip
    with pytest.raises(TransientError, match="cannot reach vCenter"):
        backend.ping()
    with pytest.raises(TransientError):
        backend.discover(VSphereSelect(names=["*"]))


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    patchd.log.setup("json", "debug", stream)
    yield stream
    structlog.reset_defaults()


def test_password_never_in_logs_errors_describe_or_plan(
    sims: Callable[..., Sim],
    tmp_path: Path,
    captured_logs: io.StringIO,
    backends: list[VSphereBackend],
) -> None:
    secret = f"Zx-{uuid.uuid4().hex}-pw"  # vcsim's test bed accepts any password
    (tmp_path / "secret").write_text(secret + "\n")
    (tmp_path / "secret").chmod(0o600)
    sim = sims(vms=1)
    [name] = list(sim.vms())
    fleet(sim, [name], "1")
    sim.tag("wave", "1", name)
    backend = make_backend(sim, tmp_path, backends, password_file=str(tmp_path / "secret"))
    errors: list[str] = []
    [target] = backend.discover(VSphereSelect(tags=["wave:1"]))  # SOAP and REST logins
    facts = backend.describe(target)
    sim.terminate_sessions()
    backend.ping()  # a re-login, which reads the password again
    sim.power_off(name)
    try:
        backend.check_update(target, {}, PatchModel(command=["true"], version="2"))
    except StepFailed as err:
        errors.append(str(err))
    wrong = tmp_path / "wrong-host"
    wrong.write_text(secret)
    wrong.chmod(0o600)
    unreachable = VSphereBackend(
        "x",
        {"host": "127.0.0.1", "port": 9, "protocol": "http", "insecure": True, "username": "u",
         "password_file": str(wrong), "retries": 0},
    )  # fmt: skip
    try:
        unreachable.ping()
    except TransientError as err:
        errors.append(str(err))
    patchd.log.get("test").info("echo", value=f"x{secret}x")

    # `patchd plan` for a group of this backend: the powered-off VM is skipped, as a run
    # would skip it (not running: no error budget spent).
    config = tmp_path / "patchd.toml"
    write_config(
        config,
        {
            "windows": {"w": {"days": ["sat"], "duration": "4h"}},
            "backends": {
                "vc": {
                    "type": "vsphere",
                    "host": sim.process.host,
                    "port": sim.process.port,
                    "protocol": "http",
                    "insecure": True,
                    "username": "user",
                    "password_file": tmp_path / "secret",
                }
            },
            "groups": {
                "g": {
                    "backend": "vc",
                    "window": "w",
                    "select": {"tags": ["wave:1"]},
                    "patch": {"command": ["true"], "version": "2"},
                }
            },
        },
    )
    settings = load_settings(config)
    shown = plan(
        settings,
        SqliteStore(tmp_path / "plan.db"),
        {"vc": WithPatch(backend, lambda: settings.groups["g"].patch)},  # type: ignore[dict-item]
        "g",
        datetime.now(UTC),
    )
    assert [t["action"] for t in shown["targets"]] == ["skip"]
    assert "not running" in shown["targets"][0]["reason"]
    assert "powered-on VMs only" in shown["targets"][0]["reason"]
    assert secret not in json.dumps(shown)
    assert secret not in repr(settings)

    logs = captured_logs.getvalue()
    assert "vsphere_login" in logs and "x***x" in logs  # registered with the redactor
    assert secret not in logs
    assert len(errors) == 2 and not any(secret in e for e in errors)
    assert secret not in json.dumps(dict(facts))
    assert secret not in repr(backend.config) and secret not in repr(backend.__dict__)


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("tls")
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=127.0.0.2", "-addext", "subjectAltName=IP:127.0.0.2",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_default_ca_file_thumbprint_and_insecure(
    sims: Callable[..., Sim],
    tmp_path: Path,
    certificate: tuple[Path, Path],
    captured_logs: io.StringIO,
    backends: list[VSphereBackend],
) -> None:
    cert, key = certificate
    sim = sims(vms=1, listen="127.0.0.2:0", extra=("-tls-cert", str(cert), "-tls-key", str(key)))
    assert (sim.process.scheme, sim.process.host) == ("https", "127.0.0.2")
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    sha1 = hashlib.sha1(der).hexdigest()
    sha256 = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())

    def connect(**tls: Any) -> VSphereBackend:
        backend = make_backend(sim, tmp_path, backends, **{"insecure": False, **tls})
        backend.ping()
        return backend

    with pytest.raises(LoginFailed, match="certificate not trusted"):
        connect()
    connect(ca_file=str(cert))
    pinned = connect(thumbprint=sha1)
    connect(thumbprint=sha256)
    with pytest.raises(LoginFailed, match="not the configured thumbprint"):
        connect(thumbprint="00" * 20)
    # The REST (tags) API goes through the same pinned TLS.
    assert pinned.tags.call("GET", "/tagging/tag") in (None, [])
    assert [t.name for t in pinned.discover(VSphereSelect(names=["*"]))] == ["DC0_C0_RP0_VM0"]

    assert "vsphere_tls_unverified" not in captured_logs.getvalue()
    insecure = connect(insecure=True)
    insecure.session.close()
    insecure.ping()  # logs in again: warned again
    warnings = [
        json.loads(line)
        for line in captured_logs.getvalue().splitlines()
        if "vsphere_tls_unverified" in line
    ]
    assert len(warnings) == 2 and all(w["level"] == "warning" for w in warnings)
