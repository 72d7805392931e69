"""Fault points: parsing, arming only under the test flag, crash and raise, and that
every named point exists in the code and is handled by the engine."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from patchd import faults
from patchd.config import load_settings
from patchd.engine import NullObserver, RunRequest, run_group
from patchd.state import open_store
from patchd.testing import FakeBackend
from tests.conftest import write_config

PACKAGE = Path(__file__).resolve().parents[2] / "patchd"
T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


def test_parse_and_the_test_flag() -> None:
    assert faults.parse("docker.after_stop=crash, engine.after_apply=raise@3") == {
        "docker.after_stop": ("crash", 1),
        "engine.after_apply": ("raise", 3),
    }
    for bad in (
        "nope=crash",
        "docker.after_stop",
        "docker.after_stop=explode",
        "docker.after_stop=crash@0",
        "docker.after_stop=crash@x",
        "journal.after.applying=raise",
    ):
        with pytest.raises(faults.FaultSpecError):
            faults.parse(bad)
    spec = {faults.SPEC: "engine.after_apply=raise"}
    assert faults.from_environment(spec).plan == {}  # no test flag: ignored
    assert faults.from_environment({**spec, faults.ENABLE: "1"}).plan


def test_raise_fires_on_the_nth_hit_only() -> None:
    armed = faults.Faults(faults.parse("engine.after_apply=raise@2"))
    armed.hit("engine.after_apply")
    with pytest.raises(faults.FaultInjected):
        armed.hit("engine.after_apply")
    armed.hit("engine.after_apply")
    with pytest.raises(AssertionError):
        armed.hit("no.such.point")


def test_crash_ends_the_process_at_once() -> None:
    code = "from patchd import faults\nfaults.hit('docker.after_stop')\nprint('survived')\n"
    env = {faults.ENABLE: "1", faults.SPEC: "docker.after_stop=crash", "PATH": "/usr/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == faults.CRASH_EXIT
    assert "survived" not in done.stdout
    assert "fault point docker.after_stop: crashing" in done.stderr


def test_a_bad_spec_is_a_clear_exit_2(tmp_path: Path) -> None:
    env = {faults.ENABLE: "1", faults.SPEC: "bogus=crash", "PATH": "/usr/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "patchd.cli", "version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done
    assert "PATCHD_FAULTS: bad item 'bogus=crash'" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_point_is_reached_somewhere_in_the_code() -> None:
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    named = set(re.findall(r'faults\.hit\("([a-z_.]+)"\)', source))
    journal = {p for p in faults.POINTS if p.startswith("journal.")}
    assert 'faults.hit(f"journal.before.{moved}")' in source
    assert 'faults.hit(f"journal.after.{moved}")' in source
    assert named | journal == faults.POINTS


def config(state: Path, **group: Any) -> dict[str, Any]:
    return {
        "daemon": {"state_dir": state},
        "windows": {"w": {"days": ["sat"], "duration": "4h"}},
        "backends": {"d": {"type": "docker"}},
        "groups": {"web": {"backend": "d", "window": "w", **group}},
    }


ENGINE_POINTS = sorted(
    p
    for p in faults.POINTS
    if p.startswith("engine.") or p.startswith("journal.before.")
    if p
    not in {"journal.before.snapshotting", "journal.before.rolling_back", "engine.after_rollback"}
    if not p.endswith(("rolled_back", "rollback_failed", "out_of_service"))
)


@pytest.mark.parametrize("point", ENGINE_POINTS)
def test_a_raise_at_any_engine_point_leaves_the_target_consistent(
    point: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure anywhere from the snapshot to the commit ends in a rollback to v1 (or a
    commit, for a failure after the commit was done) and nothing left over."""
    path = write_config(tmp_path / "patchd.toml", config(tmp_path / "state", max_errors="100%"))
    settings = load_settings(path)
    store = open_store(settings.daemon.state_dir / "patchd.db")
    fake = FakeBackend("d")
    fake.add("c1")
    fake.latest["app"] = "v2"
    monkeypatch.setattr(faults, "_active", faults.Faults(faults.parse(f"{point}=raise")))
    result = run_group(
        RunRequest(
            run_id="r1",
            group=settings.groups["web"],
            backend=fake,  # type: ignore[arg-type]
            store=store,
            clock=lambda: T0,
            may_start=lambda now: True,
            observer=NullObserver(),
            sleep=lambda s: None,
        )
    )
    [outcome] = result.outcomes
    item = fake.targets["c1"]
    assert store.unfinished_targets() == []
    assert item.snapshots == {}
    if point in ("engine.after_commit", "journal.before.committed"):
        # The commit ran: the snapshot is gone, so the rollback cannot work and says so.
        assert outcome.result in ("rolled_back", "rollback_failed")
    else:
        assert outcome.result == "rolled_back", outcome
        assert item.version == "v1"
    assert f"fault point {point}" in (outcome.error or "")
