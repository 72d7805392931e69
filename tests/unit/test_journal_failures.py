"""A journal that cannot be written: no target starts without its first row, a target
whose later row fails is still rolled back, and the run starts nothing new.

`BrokenStore` is a real SqliteStore whose SQLite connection is switched to `query_only` at a
chosen moment, so every later write fails inside SQLite as on a read-only or full disk.
It stands in for those because a unit test cannot mount a file system; the integration
test test_state_dir_failures.py uses a real full and a real read-only tmpfs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.backends.base import StepFailed
from patchd.config import Settings, load_settings
from patchd.config.types import Limit
from patchd.daemon import Daemon
from patchd.reconcile import reconcile
from patchd.runner import group_lock
from patchd.state import SqliteStore, StoreError
from patchd.systemd import Notifier
from patchd.testing import FakeBackend
from tests.conftest import wait_until, write_config
from tests.unit.test_daemon import config
from tests.unit.test_engine import fleet, group, run

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


class BrokenStore(SqliteStore):
    """A Store whose writes fail from the first moment `breaks(target, state)` says so."""

    def __init__(self, path: Path, breaks: Callable[[str, str], bool]) -> None:
        super().__init__(path)
        self.breaks = breaks

    def refuse_writes(self, refuse: bool = True) -> None:
        with self._lock:
            self._db.execute(f"PRAGMA query_only = {int(refuse)}")

    def record(self, run_id: str, target: str, name: str, state: str, *a: Any, **kw: Any) -> None:
        then = kw.get("then")  # the next step's row goes in the same write
        if self.breaks(name, state) or (then is not None and self.breaks(name, then.state)):
            self.breaks = lambda n, s: False  # once: a later write after repair succeeds
            self.refuse_writes()
        super().record(run_id, target, name, state, *a, **kw)


def at(name: str, state: str) -> Callable[[str, str], bool]:
    return lambda n, s: (n, s) == (name, state)


def test_a_run_whose_first_row_cannot_be_written_touches_nothing(tmp_path: Path) -> None:
    store = BrokenStore(tmp_path / "s.db", lambda n, s: False)
    store.refuse_writes()
    backend = fleet(3)
    result = run(backend, store)
    assert result.status == "failed"
    assert result.outcomes == ()
    assert "no target was started, the journal cannot be written" in (result.error or "")
    assert "readonly database" in (result.error or "")
    assert backend.calls == []  # not even discovery
    assert store.runs() == []


def test_a_target_whose_first_row_fails_is_not_started_and_the_run_stops(
    tmp_path: Path,
) -> None:
    store = BrokenStore(tmp_path / "s.db", at("c01", "snapshotting"))
    backend = fleet(4)
    result = run(backend, store, group(max_errors=Limit(count=4)))
    assert [o.result for o in result.outcomes] == ["success", "failed", "pending", "pending"]
    assert result.status == "failed"
    c01 = result.outcomes[1]
    assert c01.journal_failed and "not started, the journal failed" in (c01.error or "")
    assert "no new target was started" in (result.outcomes[2].error or "")
    touched = {name for step, name in backend.calls if step in ("snapshot", "apply", "rollback")}
    assert touched == {"c00"}
    assert [t.version for t in backend.targets.values()] == ["v2", "v1", "v1", "v1"]
    # The run's end could not be journaled either: it is reported, not raised.
    assert "the run's end was not journaled" in (result.error or "")
    assert [r.status for r in store.runs()] == ["running"]


@pytest.mark.parametrize("state", ["snapshotted", "applying", "applied", "verifying", "verified"])
def test_a_row_that_fails_mid_patch_still_rolls_the_target_back(tmp_path: Path, state: str) -> None:
    store = BrokenStore(tmp_path / "s.db", at("c00", state))
    backend = fleet(3)
    result = run(backend, store, group(max_concurrency=Limit(count=1), max_errors=Limit(count=3)))
    [c00, c01, c02] = result.outcomes
    assert (c00.result, c00.journal_failed) == ("rolled_back", True)
    assert "readonly database" in (c00.error or "")
    assert (c01.result, c02.result) == ("pending", "pending")
    assert result.status == "failed"
    assert ("rollback", "c00") in backend.calls
    assert {t.version for t in backend.targets.values()} == {"v1"}
    assert all(not t.snapshots for t in backend.targets.values())
    # The journal still shows c00 unfinished; once it can be written, reconciliation
    # rolls it back again (idempotent) and closes the run.
    [row] = store.unfinished_targets()
    assert row.name == "c00"
    store.refuse_writes(False)
    [done] = reconcile(_settings(tmp_path), store, {"fake": backend}, lambda: T0)
    assert (done.target, done.now) == ("c00", "rolled_back")
    assert store.unfinished_targets() == []
    assert backend.targets["c00"].version == "v1"


@pytest.mark.parametrize("state,left", [("committing", "verified"), ("committed", "committing")])
def test_a_row_that_fails_once_verified_lets_the_commit_go_ahead(
    tmp_path: Path, state: str, left: str
) -> None:
    """Once "verified" is on record a restart commits the target, so the engine commits
    it too: a rollback would leave the journal claiming a version the target lacks."""
    store = BrokenStore(tmp_path / "s.db", at("c00", state))
    backend = fleet(2)
    result = run(backend, store)
    [c00, c01] = result.outcomes
    assert (c00.result, c00.journal_failed) == ("success", True)
    assert c01.result == "pending"
    assert ("rollback", "c00") not in backend.calls
    assert backend.targets["c00"].version == "v2"
    assert not backend.targets["c00"].snapshots
    [row] = store.unfinished_targets()
    assert row.state == left
    store.refuse_writes(False)
    [done] = reconcile(_settings(tmp_path), store, {"fake": backend}, lambda: T0)
    assert (done.target, done.now) == ("c00", "committed")


@pytest.mark.parametrize("state,left", [("committing", "verified"), ("rolling_back", "committing")])
def test_a_failed_commit_whose_rollback_cannot_be_journaled_is_not_rolled_back(
    tmp_path: Path, state: str, left: str
) -> None:
    """The double failure: a write that fails once "verified" is on record, then a failed
    commit. Rolled back, the target would be on v1 while its record says the new version
    passed, and a restart would commit the reverted target. It keeps v2 and its snapshot
    instead, and the restart checks and commits it."""
    store = BrokenStore(tmp_path / "s.db", at("c00", state))
    backend = fleet(2)
    backend.failures[("c00", "commit")] = StepFailed("the snapshot could not be removed")
    result = run(backend, store)
    [c00, c01] = result.outcomes
    assert (c00.result, c00.journal_failed) == ("failed", True)
    assert "not rolled back: the journal cannot record it" in (c00.error or "")
    assert f"says {left}" in (c00.error or "")
    assert c01.result == "pending"
    assert ("rollback", "c00") not in backend.calls
    assert backend.targets["c00"].version == "v2" and backend.targets["c00"].snapshots
    [row] = store.unfinished_targets()
    assert row.state == left
    store.refuse_writes(False)
    del backend.failures[("c00", "commit")]
    [done] = reconcile(_settings(tmp_path), store, {"fake": backend}, lambda: T0)
    assert (done.target, done.now) == ("c00", "committed")
    assert backend.targets["c00"].version == "v2" and not backend.targets["c00"].snapshots


def test_rollback_rows_that_fail_do_not_stop_the_rollback(tmp_path: Path) -> None:
    store = BrokenStore(tmp_path / "s.db", at("c00", "rolling_back"))
    backend = fleet(2)
    backend.unhealthy.add("v2")
    result = run(backend, store, group(max_errors=Limit(count=2)))
    assert [o.result for o in result.outcomes] == ["rolled_back", "pending"]
    assert backend.targets["c00"].version == "v1" and not backend.targets["c00"].snapshots
    assert [r.state for r in store.targets(result.run_id)] == ["verifying"]


def test_concurrent_targets_finish_when_one_journal_write_fails(tmp_path: Path) -> None:
    store = BrokenStore(tmp_path / "s.db", at("c00", "applied"))
    backend = fleet(6)
    result = run(backend, store, group(max_concurrency=Limit(count=2), max_errors=Limit(count=6)))
    ended = {o.target.name: o.result for o in result.outcomes}
    assert ended["c00"] == "rolled_back"
    assert list(ended.values()).count("pending") >= 3
    for name, outcome in ended.items():
        expected = "v2" if outcome == "success" else "v1"
        assert backend.targets[name].version == expected, (name, outcome)
        assert not backend.targets[name].snapshots


def test_check_writable_and_the_group_lock_report_an_unwritable_state_dir(
    tmp_path: Path,
) -> None:
    store = BrokenStore(tmp_path / "s.db", lambda n, s: False)
    store.check_writable()
    store.refuse_writes()
    with pytest.raises(StoreError, match="readonly database"):
        store.check_writable()
    settings = _settings(tmp_path)
    settings.daemon.state_dir.mkdir()
    (settings.daemon.state_dir / "locks").write_text("not a directory")
    with (
        pytest.raises(StoreError, match="cannot take the lock of group 'web'"),
        group_lock(settings, "web"),
    ):
        pass


def _settings(tmp_path: Path) -> Settings:
    values = {
        "daemon": {"state_dir": tmp_path / "state"},
        "windows": {"w": {"days": ["sat"], "duration": "1h"}},
        "backends": {"fake": {"type": "docker"}},
        "groups": {"web": {"backend": "fake", "window": "w"}},
    }
    return load_settings(write_config(tmp_path / "patchd.toml", values))


def test_a_daemon_whose_store_stops_taking_writes_starts_nothing_and_recovers(
    tmp_path: Path,
) -> None:
    fake = FakeBackend("d")  # no targets yet: the run at start finishes at once
    open_now = datetime.now(UTC) - timedelta(minutes=1)
    path = write_config(tmp_path / "patchd.toml", config(tmp_path / "state", open_now))
    d = Daemon(path, None, connector=lambda spec: fake, notifier=Notifier(""))
    d.start()
    runs = d.metrics.runs

    def count(status: str) -> float:
        return float(runs.labels("web", status)._value.get())  # type: ignore[attr-defined]

    try:
        wait_until(lambda: count("completed") == 1, 120, "completed runs: 1")
        for i in range(3):
            fake.add(f"c{i}")
        fake.publish("app", "v2")
        db = d.store._db
        db.execute("PRAGMA query_only = 1")  # as a full or read-only disk would refuse
        assert d.start_run("web")
        wait_until(lambda: count("failed") == 1, 120, "failed runs: 1")
        db.execute("PRAGMA query_only = 0")
        locks = tmp_path / "state" / "locks"
        shutil.rmtree(locks)
        locks.write_text("")  # the lock file cannot be created: the other refusal path
        assert d.start_run("web")
        wait_until(lambda: count("failed") == 2, 120, "failed runs: 2")
        assert [c for c in fake.calls if c[0] not in ("ping", "discover")] == []
        locks.unlink()
        assert d.start_run("web")
        wait_until(lambda: count("completed") == 2, 120, "completed runs: 2")
        assert {t.version for t in fake.targets.values()} == {"v2"}
    finally:
        d.shutdown()
