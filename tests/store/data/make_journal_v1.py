"""Writes journal_v1.sql next to this file: a journal exactly as the FIRST store wrote it.

The first store is patchd/state.py as of commit ae356b8 (before the state package and
its migrations). It created the tables itself, kept `PRAGMA user_version` at 0 and wrote
meta.schema_version = '1'. To be sure the journal comes from that code and not from
today's, this script loads that file from git history (`git show`) and writes through
it; the result is committed as a text SQL dump (`iterdump`), which test_migrations.py
loads into a fresh file. Run from the repository root, with git history present:

    .venv/bin/python tests/store/data/make_journal_v1.py

It is not run by the tests (a clean CI clone may be shallow); rerunning it must produce
the same file.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

FIRST_STORE_COMMIT = "ae356b8"
HERE = Path(__file__).resolve().parent
T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


def first_store_module(workdir: Path) -> object:
    source = subprocess.run(
        ["git", "show", f"{FIRST_STORE_COMMIT}:patchd/state.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = workdir / "first_state.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("first_state", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["first_state"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import sqlite3

    with tempfile.TemporaryDirectory() as tmp:
        first = first_store_module(Path(tmp))
        db_path = Path(tmp) / "patchd.db"
        store = first.Store(db_path)  # type: ignore[attr-defined]
        keep = first.Keep(  # type: ignore[attr-defined]
            "lab", "old image web-1", {"image": "sha256:a"}, T0 + timedelta(days=7)
        )
        store.check_writable()
        # A finished run: one target committed (with what it kept), one rolled back.
        store.start_run("r1", "web", "weekend", T0)
        for state, step, phase in (
            ("snapshotting", "snapshot", "intent"),
            ("snapshotted", "snapshot", "done"),
            ("applying", "apply", "intent"),
            ("applied", "apply", "done"),
            ("verifying", "verify", "intent"),
            ("verified", "verify", "done"),
            ("committing", "commit", "intent"),
        ):
            store.record(
                "r1", "c1", "web-1", state, T0 + timedelta(seconds=1), step=step, phase=phase,
                version_from="sha256:a", version_to="sha256:b",
                snapshot={"old": "web-1.patchd-old"} if state == "snapshotting" else None,
            )  # fmt: skip
        store.record(
            "r1", "c1", "web-1", "committed", T0 + timedelta(seconds=2), step="commit",
            phase="done", keep=keep,
        )  # fmt: skip
        store.record(
            "r1", "c2", "web-2", "rolling_back", T0 + timedelta(seconds=3), step="rollback",
            phase="intent", error="verifying: unhealthy",
        )  # fmt: skip
        store.record(
            "r1", "c2", "web-2", "rollback_failed", T0 + timedelta(seconds=4), step="rollback",
            phase="failed", error="verifying: unhealthy; rollback: gone",
        )  # fmt: skip
        store.finish_run(
            "r1", "halted", T0 + timedelta(minutes=5), 2, 1, 1,
            {"verified": {"web": "sha256:b"}, "error": None, "pending": []},
        )  # fmt: skip
        # A run a patchd died in: its target left "applied", the run still "running".
        store.start_run("r2", "db", None, T0 + timedelta(hours=1))
        store.record(
            "r2", "c3", "db-1", "applied", T0 + timedelta(hours=1, seconds=5), step="apply",
            phase="done", version_from="1.0", version_to="1.1", snapshot={"snap": "s-1"},
        )  # fmt: skip
        store.close()
        db = sqlite3.connect(db_path)
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
        dump = "\n".join(db.iterdump()) + "\n"
        db.close()
    (HERE / "journal_v1.sql").write_text(
        f"-- A journal written by the first store (patchd/state.py at {FIRST_STORE_COMMIT});\n"
        "-- made by make_journal_v1.py, which says why. PRAGMA user_version is 0.\n" + dump
    )


if __name__ == "__main__":
    main()
