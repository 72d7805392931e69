"""Soak: hundreds of real patches with random health failures and random crashes.

A fleet of 20 containers on the test bed's Docker engine is patched cycle after cycle
(each cycle publishes the next of three versions) with `patchd run --now` processes,
until at least PATCHD_SOAK_PATCHES (default 200) target patches have been started. In
each cycle a random ~10% of the fleet fails its `health.command` (so it must be rolled
back), and in most cycles the first process is armed to crash (`os._exit`, as kill -9) at
a random fault point on its N-th hit; a second process then reconciles and finishes.

After every cycle, on the real engine: 20 containers carry the fleet's names, each runs
and is healthy, none is left renamed as a snapshot, no journal row is unfinished, the
journal's last word on each target agrees with the digest it runs (committed = the new
version, rolled back = the one before), and no target whose health check failed is on
the new version. The figures are printed at the end (run with -s to see them).
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from patchd import faults
from patchd.state import SqliteStore
from tests.conftest import write_config
from tests.integration.conftest import Lab
from tests.integration.daemon_helpers import run_patchd
from tests.integration.docker_fleet import Fleet, _app, build_variants

FLEET = 20
CRASH_POINTS = sorted(
    p for p in faults.POINTS if not p.startswith("vsphere.") and not p.endswith("rollback_failed")
)


def patchd(config: Path, fault: str | None) -> subprocess.CompletedProcess[str]:
    return run_patchd("run", "soak", "--now", "-c", str(config), fault=fault, timeout=600)


def fresh_version(f: Fleet, base_image: str, cycle: int) -> str:
    """A new image (its own digest) for this cycle: an app variant with the cycle's label."""
    app = _app(cycle % 3 + 1)
    app["Labels"] = {**app["Labels"], "soak.cycle": str(cycle)}
    name = f"soak-{f.token}-c{cycle}"
    return build_variants(f.client, base_image, {name: app})[name]


def test_soak(f: Fleet, lab: Lab, tmp_path: Path) -> None:
    wanted = int(os.environ.get("PATCHD_SOAK_PATCHES", "200"))
    rng = random.Random(int(os.environ.get("PATCHD_SOAK_SEED", "20261127")))
    markers = tmp_path / "unhealthy"
    markers.mkdir()
    state = tmp_path / "state"
    config = tmp_path / "patchd.toml"
    check = ["sh", "-c", 'test ! -e "$0/$PATCHD_TARGET_NAME"', str(markers)]
    write_config(
        config,
        {
            "daemon": {"state_dir": state},
            "windows": {"any": {"days": ["mon"], "duration": "1h"}},
            "backends": {
                "lab": {"type": "docker", "url": f.docker_host, "rollback_timeout": "30s"}
            },
            "groups": {
                "soak": {
                    "backend": "lab",
                    "window": "any",
                    "select": {"labels": {"patchd.test": f.token}},
                    "max_concurrency": 5,
                    "max_errors": "50%",
                    "health": {"timeout": "120s", "stable_for": "0s", "command": check},
                }
            },
        },
    )
    f.publish(fresh_version(f, lab.base_image, 0), "s")
    names = [f.name(f"s{i:02d}") for i in range(FLEET)]
    for i in range(FLEET):
        f.run(f"s{i:02d}", "s")
    f.wait_healthy(*names)
    store = SqliteStore(state / "patchd.db")

    started = committed = rolled_back = crashes = cycles = 0
    unexpected_rollbacks = 0
    while started < wanted:
        cycles += 1
        # A bound, so a fleet that stops patching fails here instead of hanging CI.
        assert cycles <= max(30, 3 * wanted // FLEET), (cycles, started, wanted)
        before = {n: f.digest_of(n) for n in names}
        new = f.publish(fresh_version(f, lab.base_image, cycles), "s")
        failing = set(rng.sample(names, k=rng.randint(0, FLEET // 10)))
        for marker in markers.iterdir():
            marker.unlink()
        for name in failing:
            (markers / name).touch()
        fault = None
        if rng.random() < 0.8:
            fault = f"{rng.choice(CRASH_POINTS)}=crash@{rng.randint(1, 12)}"
        seen_runs = {r.id for r in store.runs("soak", limit=10_000)}

        first = patchd(config, fault)
        assert "Traceback" not in first.stderr, first.stderr
        if first.returncode == faults.CRASH_EXIT:
            crashes += 1
            second = patchd(config, None)
            assert "Traceback" not in second.stderr, second.stderr
            assert second.returncode in (0, 1), (fault, second.stdout, second.stderr)
        else:
            assert first.returncode in (0, 1), (fault, first.stdout, first.stderr)

        # The invariants, on the real engine.
        ours = f.client.api.containers(all=True, filters={"label": f"patchd.test={f.token}"})
        assert sorted(n.lstrip("/") for c in ours for n in c["Names"]) == names, (cycles, fault)
        assert f.leftovers() == [], (cycles, fault)
        assert store.unfinished_targets() == [], (cycles, fault)
        runs = [r for r in store.runs("soak", limit=10_000) if r.id not in seen_runs]
        last: dict[str, str] = {}
        for run in sorted(runs, key=lambda r: r.started):
            for row in store.targets(run.id):
                last[row.name] = row.state
                started += 1
                committed += row.state == "committed"
                rolled_back += row.state == "rolled_back"
        for name in names:
            digest = f.digest_of(name)
            assert f.is_healthy(name), (cycles, fault, name)
            state_now = last.get(name)
            if state_now == "committed":
                assert digest == new, (cycles, fault, name, state_now)
            elif state_now == "rolled_back":
                assert digest == before[name], (cycles, fault, name, state_now)
                unexpected_rollbacks += name not in failing
            else:
                assert state_now is None and digest in (before[name], new), (cycles, name)
            if name in failing:
                assert digest != new or before[name] == new, (cycles, fault, name)
        assert all(r.status != "running" for r in runs)

    lost = 0  # every cycle asserted that nothing was lost; reaching here means 0
    print(
        f"\nsoak: {cycles} cycles, {started} target patches started ({committed} committed,"
        f" {rolled_back} rolled back, {unexpected_rollbacks} of those not planned),"
        f" {crashes} crashes survived, lost containers or snapshots: {lost}"
    )
    assert started >= wanted and crashes > 0 and rolled_back > 0
