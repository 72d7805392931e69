"""The store contract suite's fixtures: one harness per Store implementation.

Every test in tests/store/test_contract.py runs once per implementation in IMPLEMENTATIONS.
To add one (PostgreSQL next), write a harness class like SqliteHarness and add it there:
the suite runs unchanged. A harness opens handles on ONE store (a fresh, empty one per
test) and, where the implementation batches concurrent writes (group commit), gives the
suite two probes into it: hold its commits while writes queue, and count transactions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import pytest

from patchd.state import SqliteStore, StoreProtocol, open_store
from tests.postgres.harness import PostgresHarness


class Harness(Protocol):
    name: str

    def open(self) -> StoreProtocol:
        """A new handle on this test's store (as a restarted patchd would open it)."""

    def hold_commits(self, store: StoreProtocol) -> AbstractContextManager[Callable[[], int]]:
        """While held, no write on `store` commits; yields how many writes wait. Raise
        pytest.skip where the implementation does not batch writes."""

    def count_transactions(self, store: StoreProtocol) -> Callable[[], int]:
        """From now on, how many write transactions `store` committed."""


class SqliteHarness:
    name = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "state" / "patchd.db"

    def open(self) -> StoreProtocol:
        return open_store(self.path)

    @contextmanager
    def hold_commits(self, store: StoreProtocol) -> Iterator[Callable[[], int]]:
        # The store commits a queued write only while holding its lock (SqliteStore._write).
        assert isinstance(store, SqliteStore)
        with store._lock:
            yield lambda: len(store._queue)

    def count_transactions(self, store: StoreProtocol) -> Callable[[], int]:
        assert isinstance(store, SqliteStore)
        commits = 0

        def trace(statement: str) -> None:
            nonlocal commits
            if statement.strip().upper() == "COMMIT":
                commits += 1

        db: sqlite3.Connection = store._db
        db.set_trace_callback(trace)
        return lambda: commits


IMPLEMENTATIONS: dict[str, Callable[[Path], Harness]] = {
    "sqlite": SqliteHarness,
    "postgres": PostgresHarness,  # on the test bed's PostgreSQL (started if not up)
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    return IMPLEMENTATIONS[request.param](tmp_path)


@pytest.fixture
def store(harness: Harness) -> Iterator[StoreProtocol]:
    handle = harness.open()
    yield handle
    handle.close()
