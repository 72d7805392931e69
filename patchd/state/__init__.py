"""The state store: runs, the per-target journal and history, and what commits kept.

`base` holds the contract every store keeps (the `Store` protocol, its rows and
StoreError); `sqlite` the SQLite store; `migrations` the SQLite schema versions.
Callers open a store with `open_store` and type it as `Store` (the protocol);
`StoreProtocol` is the same protocol under its older name.
"""

from __future__ import annotations

from pathlib import Path

from patchd.state import base
from patchd.state.base import (
    AuditRow,
    ControlRow,
    Keep,
    OutboxRow,
    RetainedRow,
    RunRow,
    StoreError,
    TargetRow,
    Then,
)
from patchd.state.sqlite import SCHEMA_VERSION, SqliteStore

Store = base.Store
StoreProtocol = base.Store


def open_store(path: Path, *, readonly: bool = False) -> Store:
    """The store in the journal file `path`, migrated to the current schema.

    readonly: open it only to read (the CLI's report commands): the file is never
    created or migrated, and a journal that does not exist yet is a StoreError naming
    the path. Writes through a read-only store are StoreErrors.
    """
    return SqliteStore(path, readonly=readonly)


__all__ = [
    "SCHEMA_VERSION",
    "AuditRow",
    "ControlRow",
    "Keep",
    "OutboxRow",
    "RetainedRow",
    "RunRow",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreProtocol",
    "TargetRow",
    "Then",
    "open_store",
]
