"""The SQLite store's own behaviour: WAL, synchronous=FULL, errors opening, read-only
handles. The contract every store keeps is tested in tests/store/."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from patchd.state import SqliteStore, StoreError, open_store
from patchd.states import TargetState

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


def test_wal_mode_is_on(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "state.db").close()
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_writes_are_synchronous_full(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state.db")
    assert isinstance(store, SqliteStore)
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_unopenable_store_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError):
        SqliteStore(blocker / "state.db")


def test_a_read_only_handle_never_creates_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "state" / "patchd.db"
    with pytest.raises(StoreError, match=f"state store {path} does not exist yet"):
        open_store(path, readonly=True)
    assert not path.parent.exists()
    path.parent.mkdir()
    with pytest.raises(StoreError, match="does not exist yet"):
        open_store(path, readonly=True)
    assert list(path.parent.iterdir()) == []


def test_a_read_only_handle_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "patchd.db"
    writer = open_store(path)
    writer.start_run("r1", "web", None, T0)
    writer.record("r1", "c1", "web-1", TargetState.APPLIED, T0, step="apply", phase="done")
    reader = open_store(path, readonly=True)
    assert [r.id for r in reader.runs()] == ["r1"]
    assert [r.state for r in reader.unfinished_targets()] == ["applied"]
    with pytest.raises(StoreError, match="readonly"):
        reader.check_writable()
    with pytest.raises(StoreError, match="readonly"):
        reader.record("r1", "c1", "web-1", TargetState.ROLLING_BACK, T0, step="s", phase="p")
    writer.start_run("r2", "web", None, T0)  # a reader sees what the writer adds later
    assert [r.id for r in reader.runs()] == ["r2", "r1"]
    reader.close()
    writer.close()
