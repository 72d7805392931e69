"""The SQLite state store: runs, target journal, unfinished-target discovery."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd.state import Store, StoreError

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


def test_journal_and_targets_survive_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.start_run("r1", "web", "weekend", T0)
    store.record(
        "r1",
        "c1",
        "web-1",
        "snapshotting",
        T0,
        step="snapshot",
        phase="intent",
        version_from="sha256:a",
        version_to="sha256:b",
    )
    store.record(
        "r1",
        "c1",
        "web-1",
        "snapshotted",
        T0 + timedelta(seconds=1),
        step="snapshot",
        phase="done",
        snapshot={"old": "web-1.patchd-old"},
    )
    store.record("r1", "c2", "web-2", "committed", T0, step="commit", phase="done")
    store.close()

    store = Store(tmp_path / "state.db")
    [unfinished] = store.unfinished_targets()
    assert unfinished.target == "c1"
    assert unfinished.state == "snapshotted"
    assert unfinished.version_from == "sha256:a"  # kept from the earlier row
    assert unfinished.snapshot == {"old": "web-1.patchd-old"}
    assert [(s, p) for s, p, _ in store.journal("r1", "c1")] == [
        ("snapshot", "intent"),
        ("snapshot", "done"),
    ]
    store.finish_run("r1", "completed", T0 + timedelta(minutes=5), 2, 1, 1, {"halted": False})
    run = store.last_run("web")
    assert run is not None
    assert (run.status, run.total, run.succeeded, run.failed) == ("completed", 2, 1, 1)
    assert run.finished == T0 + timedelta(minutes=5)
    assert store.last_run("db") is None


def test_wal_mode_is_on(tmp_path: Path) -> None:
    Store(tmp_path / "state.db").close()
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unopenable_store_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError):
        Store(blocker / "state.db")
