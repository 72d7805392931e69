"""The store contract suite's harness for PostgresStore (see tests/store/conftest.py).

Each test gets its own schema in the bed's database `patchd` (the URL's
`options=-csearch_path=...`, passed through to libpq as any URL option is): cheaper than
a database per test, and just as empty. The server is started on first use if it is not
up, and stopped at exit if this process started it.
"""

from __future__ import annotations

import atexit
import functools
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import psycopg

from patchd.state import StoreProtocol
from patchd.state.postgres import PostgresStore
from tests.pglab import PgLab, ensure_up, stop_if_started


@functools.cache
def bed() -> PgLab:
    lab = ensure_up()
    atexit.register(stop_if_started, lab)
    return lab


class PostgresHarness:
    name = "postgres"

    def __init__(self, tmp_path: Path) -> None:
        lab = bed()
        schema = f"contract_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(lab.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self.url = f"{lab.url}?options={quote(f'-csearch_path={schema}')}"

    def open(self) -> StoreProtocol:
        return PostgresStore(self.url, outage_wait=10)

    @contextmanager
    def hold_commits(self, store: StoreProtocol) -> Iterator[Callable[[], int]]:
        # As SqliteStore: a queued write commits only under the store's lock.
        assert isinstance(store, PostgresStore)
        with store._lock:
            yield lambda: len(store._queue)

    def count_transactions(self, store: StoreProtocol) -> Callable[[], int]:
        assert isinstance(store, PostgresStore)
        commits = 0
        real = store._transaction

        def counted(batch: list[object], unsure: list[str]) -> None:
            nonlocal commits
            real(batch, unsure)  # type: ignore[arg-type]
            commits += 1

        store._transaction = counted  # type: ignore[method-assign,assignment]
        return lambda: commits
