"""The state store: runs, the per-target journal and history, and what commits kept.

`base` holds the contract every store keeps (the `Store` protocol, its rows and
StoreError); `sqlite` the SQLite store; `migrations` the SQLite schema versions.
Callers open a store with `open_store` and type it as `StoreProtocol` (the protocol).

Transition: `Store` still names the SQLite class, because daemon.py and cli.py (another
branch's) construct `Store(path)`. Once they call `open_store`, `Store` becomes the
protocol (`Store = base.Store` below) and `StoreProtocol` can go.
"""

from __future__ import annotations

from pathlib import Path

from patchd.state import base
from patchd.state.base import Keep, RetainedRow, RunRow, StoreError, TargetRow
from patchd.state.sqlite import SCHEMA_VERSION, SqliteStore

StoreProtocol = base.Store
Store = SqliteStore  # see the module docstring: becomes base.Store


def open_store(path: Path, *, readonly: bool = False) -> StoreProtocol:
    """The store in the journal file `path`, migrated to the current schema.

    readonly: open it only to read (the CLI's report commands): the file is never
    created or migrated, and a journal that does not exist yet is a StoreError naming
    the path. Writes through a read-only store are StoreErrors.
    """
    return SqliteStore(path, readonly=readonly)


__all__ = [
    "SCHEMA_VERSION",
    "Keep",
    "RetainedRow",
    "RunRow",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreProtocol",
    "TargetRow",
    "open_store",
]
