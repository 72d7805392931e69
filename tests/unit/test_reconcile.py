"""Restart reconciliation: targets left mid-patch are rolled back; runs left running close."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from patchd.backends.base import RollbackFailed
from patchd.config import load_settings
from patchd.reconcile import reconcile
from patchd.runner import group_lock
from patchd.state import Store, open_store
from patchd.testing import FakeBackend
from tests.conftest import write_config

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


def config(state: Path, **group: Any) -> dict[str, Any]:
    return {
        "daemon": {"state_dir": state},
        "windows": {"w": {"days": ["sat"], "duration": "4h"}},
        "backends": {"d": {"type": "docker"}},
        "groups": {"web": {"backend": "d", "window": "w", **group}},
    }


def crashed_mid_apply(tmp_path: Path) -> tuple[object, Store, FakeBackend]:
    path = write_config(tmp_path / "patchd.toml", config(tmp_path / "state"))
    settings = load_settings(path)
    store = open_store(settings.daemon.state_dir / "patchd.db")
    fake = FakeBackend("d")
    fake.add("c1")
    fake.add("c2")
    # What a patchd killed during c1's apply leaves: the journal says "applying", the
    # snapshot exists, the target already runs the new version.
    store.start_run("r1", "web", "w", T0)
    store.record(
        "r1",
        "c1",
        "c1",
        "snapshotting",
        T0,
        step="snapshot",
        phase="intent",
        version_from="v1",
        version_to="v2",
        snapshot={"name": "patchd-r1"},
    )
    fake.targets["c1"].snapshots["patchd-r1"] = "v1"
    store.record("r1", "c1", "c1", "snapshotted", T0, step="snapshot", phase="done")
    store.record("r1", "c1", "c1", "applying", T0, step="apply", phase="intent")
    fake.targets["c1"].version = "v2"
    store.record("r1", "c2", "c2", "committed", T0, step="commit", phase="done")
    return settings, store, fake


def test_unfinished_target_is_rolled_back_and_the_run_closed(tmp_path: Path) -> None:
    settings, store, fake = crashed_mid_apply(tmp_path)
    [item] = reconcile(settings, store, {"d": fake}, lambda: T0)  # type: ignore[arg-type]
    assert (item.target, item.was, item.now) == ("c1", "applying", "rolled_back")
    assert fake.targets["c1"].version == "v1"
    assert fake.targets["c1"].snapshots == {}
    assert store.unfinished_targets() == []
    run = store.last_run("web")
    assert run is not None and run.status == "interrupted"
    assert (run.succeeded, run.failed) == (1, 1)
    assert reconcile(settings, store, {"d": fake}, lambda: T0) == []  # type: ignore[arg-type]


def test_failed_reconcile_is_reported_and_kept(tmp_path: Path) -> None:
    settings, store, fake = crashed_mid_apply(tmp_path)
    fake.failures[("c1", "rollback")] = RollbackFailed("old container is gone")
    [item] = reconcile(settings, store, {"d": fake}, lambda: T0)  # type: ignore[arg-type]
    assert item.now == "rollback_failed"
    assert "old container is gone" in item.detail
    assert fake.targets["c1"].snapshots  # nothing removed
    [row] = [r for r in store.targets("r1") if r.target == "c1"]
    assert row.state == "rollback_failed"


def test_a_group_running_elsewhere_is_left_alone(tmp_path: Path) -> None:
    settings, store, fake = crashed_mid_apply(tmp_path)
    with group_lock(settings, "web"):  # type: ignore[arg-type]
        assert reconcile(settings, store, {"d": fake}, lambda: T0) == []  # type: ignore[arg-type]
    assert fake.targets["c1"].version == "v2"
    assert store.last_run("web").status == "running"  # type: ignore[union-attr]


def crashed_mid_commit(tmp_path: Path, state: str) -> tuple[object, Store, FakeBackend]:
    settings, store, fake = crashed_mid_apply(tmp_path)
    store.record("r1", "c1", "c1", "applied", T0, step="apply", phase="done")
    store.record("r1", "c1", "c1", "verifying", T0, step="verify", phase="intent")
    store.record("r1", "c1", "c1", "verified", T0, step="verify", phase="done")
    if state == "committing":
        store.record("r1", "c1", "c1", "committing", T0, step="commit", phase="intent")
    return settings, store, fake


def test_a_verified_target_is_checked_again_and_committed(tmp_path: Path) -> None:
    for state in ("verified", "committing"):
        (tmp_path / state).mkdir()
        settings, store, fake = crashed_mid_commit(tmp_path / state, state)
        [item] = reconcile(settings, store, {"d": fake}, lambda: T0)  # type: ignore[arg-type]
        assert (item.was, item.now) == (state, "committed")
        assert fake.targets["c1"].version == "v2"
        assert ("verify", "c1") in fake.calls and ("commit", "c1") in fake.calls
        assert fake.targets["c1"].snapshots == {}  # the commit removed it (keep = 0)
        [row] = [r for r in store.targets("r1") if r.target == "c1"]
        assert row.state == "committed"
        run = store.last_run("web")
        assert run is not None and (run.status, run.succeeded, run.failed) == (
            "interrupted",
            2,
            0,
        )


def test_a_verified_target_that_is_unhealthy_now_is_rolled_back(tmp_path: Path) -> None:
    settings, store, fake = crashed_mid_commit(tmp_path, "committing")
    fake.unhealthy.add("v2")
    [item] = reconcile(settings, store, {"d": fake}, lambda: T0)  # type: ignore[arg-type]
    assert (item.was, item.now) == ("committing", "rolled_back")
    assert fake.targets["c1"].version == "v1"
    assert ("commit", "c1") not in fake.calls
    [row] = [r for r in store.targets("r1") if r.target == "c1"]
    assert "finishing the commit: c1 is unhealthy on v2" in (row.error or "")


def test_a_commit_that_keeps_its_snapshot_is_recorded_for_release(tmp_path: Path) -> None:
    settings, store, fake = crashed_mid_commit(tmp_path, "verified")
    path = write_config(
        tmp_path / "patchd.toml", config(tmp_path / "state", snapshot={"keep": "1h"})
    )
    settings = load_settings(path)
    [item] = reconcile(settings, store, {"d": fake}, lambda: T0)  # type: ignore[arg-type]
    assert item.now == "committed"
    [row] = store.retained()
    assert (row.backend, row.target, row.expires) == ("d", "c1", T0 + timedelta(hours=1))


def test_a_backend_that_is_down_leaves_its_targets_for_a_later_start(tmp_path: Path) -> None:
    settings, store, fake = crashed_mid_apply(tmp_path)
    fake.up = False
    [item] = reconcile(settings, store, {"d": fake}, lambda: T0)  # type: ignore[arg-type]
    assert (item.was, item.now) == ("applying", "applying")
    assert "cannot be reached" in item.detail
    assert ("rollback", "c1") not in fake.calls  # not given up as rollback_failed
    assert [r.state for r in store.unfinished_targets()] == ["applying"]
    run = store.last_run("web")
    assert run is not None and (run.status, run.succeeded, run.failed) == ("interrupted", 1, 0)

    fake.up = True
    [item] = reconcile(settings, store, {"d": fake}, lambda: T0)  # type: ignore[arg-type]
    assert (item.was, item.now) == ("applying", "rolled_back")
    assert fake.targets["c1"].version == "v1"
    assert store.unfinished_targets() == []
    run = store.last_run("web")
    assert run is not None and (run.status, run.succeeded, run.failed) == ("interrupted", 1, 1)
