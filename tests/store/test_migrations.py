"""SQLite schema versions: a journal written by the first store (before user_version)
opens, keeps its rows and is stamped with the current version; a newer journal, or a
file that is not a journal, is refused; a failing migration leaves the journal as it was.

data/journal_v1.sql is a dump of a journal the first store's own code wrote (see
data/make_journal_v1.py for how and why).
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from patchd.state import StoreError, migrations, open_store
from patchd.state.migrations import CURRENT, Migration
from patchd.states import RunStatus, TargetState

DUMP = Path(__file__).parent / "data" / "journal_v1.sql"


def first_store_journal(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.executescript(DUMP.read_text())
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    return path


def versions(path: Path) -> tuple[int, str]:
    db = sqlite3.connect(path)
    try:
        user_version = db.execute("PRAGMA user_version").fetchone()[0]
        [meta] = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return user_version, meta
    finally:
        db.close()


def test_a_journal_of_the_first_store_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    path = first_store_journal(tmp_path / "patchd.db")
    store = open_store(path)
    try:
        assert [(r.id, r.status) for r in store.runs()] == [("r2", "running"), ("r1", "halted")]
        halted = store.runs("web")[0]
        assert halted.status is RunStatus.HALTED
        assert (halted.total, halted.succeeded, halted.failed) == (2, 1, 1)
        assert halted.detail["verified"] == {"web": "sha256:b"}
        [left] = store.unfinished_targets()
        assert (left.run_id, left.name, left.state) == ("r2", "db-1", TargetState.APPLIED)
        assert left.snapshot == {"snap": "s-1"}
        assert [r.target for r in store.targets("r1")] == ["c1", "c2"]
        assert len(store.journal("r1", "c1")) == 8
        assert store.rollback_failures() == {"web": datetime.fromtimestamp(1795831204, UTC)}
        [kept] = store.retained()
        assert (kept.target, kept.data) == ("web-1", {"image": "sha256:a"})
        store.start_run("r3", "web", None, datetime(2026, 12, 1, tzinfo=UTC))  # writable
    finally:
        store.close()
    assert versions(path) == (CURRENT, str(CURRENT))


def test_a_read_only_handle_reads_the_first_stores_journal_without_writing(
    tmp_path: Path,
) -> None:
    path = first_store_journal(tmp_path / "patchd.db")
    store = open_store(path, readonly=True)
    try:
        assert [r.id for r in store.runs()] == ["r2", "r1"]
    finally:
        store.close()
    assert versions(path) == (0, "1")  # version 1 recognised, nothing written


def test_opening_twice_migrates_once(tmp_path: Path) -> None:
    path = first_store_journal(tmp_path / "patchd.db")
    open_store(path).close()
    open_store(path).close()
    assert versions(path) == (CURRENT, str(CURRENT))
    assert len(open_store(path, readonly=True).runs()) == 2


def test_a_new_journal_gets_the_current_version(tmp_path: Path) -> None:
    open_store(tmp_path / "patchd.db").close()
    assert versions(tmp_path / "patchd.db") == (CURRENT, str(CURRENT))


def test_a_journal_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "patchd.db"
    open_store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {CURRENT + 1}")
    db.close()
    for readonly in (False, True):
        with pytest.raises(StoreError) as caught:
            open_store(path, readonly=readonly)
        message = str(caught.value)
        assert str(path) in message
        assert f"schema version {CURRENT + 1}, newer than this patchd knows ({CURRENT})" in message
    assert versions(path)[0] == CURRENT + 1  # untouched


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (id INTEGER)")
    db.close()
    with pytest.raises(StoreError, match=f"{path} is not a patchd journal"):
        open_store(path)


def test_a_failing_migration_leaves_the_journal_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A made-up version 2 whose second statement fails: the first must not stay.
    path = first_store_journal(tmp_path / "patchd.db")
    broken = Migration(
        CURRENT + 1,
        "made up for this test",
        ("CREATE TABLE extra (x INTEGER)", "ALTER TABLE nowhere ADD COLUMN y INTEGER"),
    )
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, broken))
    monkeypatch.setattr(migrations, "CURRENT", CURRENT + 1)
    with pytest.raises(StoreError, match=f"cannot open state store {path}: no such table"):
        open_store(path)
    assert versions(path) == (0, "1")
    db = sqlite3.connect(path)
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None
    db.close()


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in migrations.MIGRATIONS] == list(
        range(1, len(migrations.MIGRATIONS) + 1)
    )
    assert migrations.MIGRATIONS[-1].version == CURRENT


def test_opening_a_current_journal_writes_nothing(tmp_path: Path) -> None:
    # So it opens on a full disk and while another process holds the write lock.
    path = tmp_path / "patchd.db"
    open_store(path).close()
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        store = open_store(path)  # would wait out SQLite's busy timeout, then fail
        assert store.runs() == []
        store.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_version_2_adds_controls_and_audit_to_a_first_store_journal(tmp_path: Path) -> None:
    path = first_store_journal(tmp_path / "patchd.db")
    before = open_store(path, readonly=True)  # an older journal reads: no controls yet
    try:
        assert before.controls("pause") == [] and before.audit_trail() == []
    finally:
        before.close()
    store = open_store(path)
    try:
        at = datetime(2026, 12, 1, tzinfo=UTC)
        store.put_control("pause", "web", "", {"by": "root"}, at)
        store.audit(at, 0, 1, "root", "pause", "web", {})
        assert [c.group for c in store.controls("pause")] == ["web"]
        assert [a.action for a in store.audit_trail()] == ["pause"]
        assert [r.id for r in store.runs()] == ["r2", "r1"]  # the old rows are kept
    finally:
        store.close()
    assert versions(path) == (CURRENT, str(CURRENT))  # every migration since, 2 included
