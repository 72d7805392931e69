"""Group commit's wake-ups (state/groupcommit.py), on the SQLite store: a write that found
the lock taken goes on when it is released, by a commit or by a read, without waiting
for its TICK (set to a minute here, so that only a wake-up can end the wait in time)."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from patchd.state import SqliteStore, groupcommit
from patchd.states import TargetState

AT = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def _writer(store: SqliteStore, target: str) -> threading.Thread:
    def write() -> None:
        store.record("r1", target, target, TargetState.APPLYING, AT, step="apply", phase="p")

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def _wait_queued(store: SqliteStore, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(store._queue) < count:
        assert time.monotonic() < deadline, f"{len(store._queue)} of {count} writes queued"
        time.sleep(0.005)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SqliteStore:
    monkeypatch.setattr(groupcommit, "TICK", 60.0)
    opened = SqliteStore(tmp_path / "state.db")
    opened.start_run("r1", "web", None, AT)
    return opened


def test_a_write_queued_behind_a_read_goes_on_when_the_read_ends(store: SqliteStore) -> None:
    with store._exclusive():  # a read in progress
        writer = _writer(store, "c1")
        _wait_queued(store, 1)
    writer.join(20)
    assert not writer.is_alive(), "the write was not woken when the read ended"
    assert [r.target for r in store.targets("r1")] == ["c1"]
    store.close()


def test_writes_queued_behind_a_commit_all_land_when_it_ends(store: SqliteStore) -> None:
    """A commit is held inside its transaction; the writes queued meanwhile go on when it
    ends: the oldest of them is woken to commit them all."""
    release = threading.Event()

    def slow(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO meta (key, value) VALUES ('slow', '1')")
        release.wait(30)

    first = threading.Thread(target=store._write, args=(slow,), daemon=True)
    first.start()
    deadline = time.monotonic() + 30
    while not store._lock.locked():  # the slow commit has the lock
        assert time.monotonic() < deadline
        time.sleep(0.005)
    writers = [_writer(store, f"c{i}") for i in range(5)]
    _wait_queued(store, 5)
    release.set()
    for writer in [first, *writers]:
        writer.join(20)
        assert not writer.is_alive(), "a write was not woken when the commit ended"
    assert sorted(r.target for r in store.targets("r1")) == [f"c{i}" for i in range(5)]
    store.close()
