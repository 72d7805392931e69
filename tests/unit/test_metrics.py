"""Gauges patchd reads from its store: pending windows, kept items, failed rollbacks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.config import Settings, load_settings
from patchd.metrics import JournalCollector, journal_view, pending_windows
from patchd.state import Keep, SqliteStore, Store
from tests.conftest import write_config


def config(state: Path) -> dict[str, Any]:
    return {
        "daemon": {"state_dir": state},
        "windows": {"sat": {"days": ["sat"], "start": "02:00", "duration": "4h"}},
        "backends": {"d": {"type": "docker"}, "e": {"type": "docker"}},
        "groups": {
            "web": {"backend": "d", "window": "sat"},
            "db": {"backend": "e", "window": "sat"},
        },
    }


SAT = datetime(2026, 11, 28, 2, 30, tzinfo=UTC)  # inside an opening of `sat`
WEEK = timedelta(days=7)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(write_config(tmp_path / "patchd.toml", config(tmp_path / "state")))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return SqliteStore(tmp_path / "patchd.db")


def add_run(
    store: Store,
    run_id: str,
    at: datetime,
    status: str,
    *,
    failed: int = 0,
    pending: tuple[str, ...] = (),
    window: str | None = "sat",
    group: str = "web",
) -> None:
    store.start_run(run_id, group, window, at)
    detail: dict[str, Any] = {"pending": list(pending), "verified": {}}
    store.finish_run(run_id, status, at + timedelta(minutes=20), 3, 1, failed, detail)


def test_pending_windows_counts_openings_in_a_row(settings: Settings, store: Store) -> None:
    web = settings.groups["web"]
    assert pending_windows(settings, store, web) == 0  # never ran
    add_run(store, "clean", SAT - 4 * WEEK, "completed")
    add_run(store, "a", SAT - 3 * WEEK, "window_closed", pending=("c1",))
    assert pending_windows(settings, store, web) == 1
    add_run(store, "b1", SAT - 2 * WEEK, "halted", failed=1, pending=("c2",))
    add_run(store, "b2", SAT - 2 * WEEK + timedelta(hours=1), "stopped", pending=("c2",))
    assert pending_windows(settings, store, web) == 2  # two runs in one opening count once
    add_run(store, "now", SAT - WEEK - timedelta(days=3), "completed", failed=1, window=None)
    assert pending_windows(settings, store, web) == 3  # `patchd run --now` outside a window
    add_run(store, "c", SAT - WEEK, "failed")  # discovery failed: nothing was checked
    assert pending_windows(settings, store, web) == 4
    store.start_run("running", "web", "sat", SAT)  # in progress: not counted yet
    assert pending_windows(settings, store, web) == 4
    add_run(store, "d", SAT + timedelta(minutes=30), "completed")
    assert pending_windows(settings, store, web) == 0  # a clean run ends the streak


def test_journal_view_reads_kept_items_and_failed_rollbacks(
    settings: Settings, store: Store
) -> None:
    add_run(store, "r1", SAT, "completed", failed=1)
    store.record("r1", "t1", "t1", "rolling_back", SAT, step="rollback", phase="intent")
    store.record(
        "r1",
        "t1",
        "t1",
        "rollback_failed",
        SAT + timedelta(minutes=5),
        step="rollback",
        phase="failed",
    )
    add_run(store, "r2", SAT, "completed", group="gone")
    store.record("r2", "t9", "t9", "rollback_failed", SAT, step="rollback", phase="failed")
    for target, backend, kept, expires in (
        ("t2", "d", "snapshot", SAT + timedelta(hours=2)),
        ("t3", "d", "snapshot", SAT + timedelta(hours=1)),
        ("t4", "e", "image", SAT + timedelta(days=1)),
    ):
        keep = Keep(backend, kept, {}, expires)
        store.record("r1", target, target, "committed", SAT, step="commit", phase="done", keep=keep)
    view = journal_view(settings, store)
    assert view.retained_oldest_expiry == {
        "d": SAT + timedelta(hours=1),
        "e": SAT + timedelta(days=1),
    }
    assert view.retained_items == {"d": 2, "e": 1}
    # Only configured groups: "gone" left the config.
    assert view.last_rollback_failed == {"web": SAT + timedelta(minutes=5)}
    assert view.pending_windows == {"web": 1, "db": 0}

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in JournalCollector(lambda: view).collect()
        for s in family.samples
    }
    assert samples[("patchd_retained_items", (("backend", "d"),))] == 2
    assert (
        samples[("patchd_retained_oldest_expiry_timestamp_seconds", (("backend", "d"),))]
        == (SAT + timedelta(hours=1)).timestamp()
    )
    assert samples[("patchd_group_pending_windows", (("group", "web"),))] == 1
    assert (
        samples[("patchd_group_last_rollback_failed_timestamp_seconds", (("group", "web"),))]
        == (SAT + timedelta(minutes=5)).timestamp()
    )
