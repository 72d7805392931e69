"""Group commit, shared by the SQLite and the PostgreSQL store: writes that arrive while
another thread commits wait, then one of them commits all that queued up in ONE
transaction (one fsync); every caller returns only after its own write is durable.

Why not simply "wait for the store's lock, then see whether a commit carried you": a
thread whose write a commit carried would still queue for the lock, and Python's lock is
not fair, so a thread that just arrived often takes it first and holds it for a whole
commit of its own, doubling the carried writers' wait. Here a writer waits on its own
event instead: the committing thread wakes each writer it carried at once, and after
releasing the lock wakes the oldest writer still queued to commit the next batch (so
does a read, `_exclusive`, after using the connection). A wait also ends every TICK
seconds to try the lock again, so a wake-up that never comes (a thread that died while
committing, a lock held from outside) delays, never blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

TICK = 0.1  # seconds


class Pending:
    """A write waiting for a group commit; the store's subclass adds what to write."""

    __slots__ = ("done", "error", "turn")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None
        self.turn = threading.Event()  # set when committed, or when it may commit


P = TypeVar("P", bound=Pending)


class GroupCommit(Generic[P]):
    """The queue and the lock of a store (`_lock` also guards its connection)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[P] = []
        self._queue_lock = threading.Lock()

    def _commit_group(self, batch: list[P]) -> None:
        """Commit `batch` in one transaction (the caller holds `_lock`) and mark each
        write done, with its error if it failed."""
        raise NotImplementedError  # the store's

    def _group_commit(self, entry: P) -> None:
        """Queue `entry`; return once a group commit carried it (see entry.error)."""
        with self._queue_lock:
            self._queue.append(entry)
        while not entry.done:
            entry.turn.clear()
            if self._lock.acquire(blocking=False):
                self._lead()
            else:
                entry.turn.wait(TICK)

    def _lead(self) -> None:
        """With `_lock` held: commit what queued up, release, and wake whom it concerns."""
        batch: list[P] = []
        try:
            with self._queue_lock:
                batch, self._queue = self._queue, []
            if batch:
                self._commit_group(batch)
        finally:
            self._lock.release()
            self._wake_next()  # first: its commit overlaps the wake-ups below
            for done in batch:
                done.turn.set()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The lock, for anything but a group commit (a read): a write that found it
        taken is woken when it is released, not a TICK later."""
        with self._lock:
            yield
        self._wake_next()

    def _wake_next(self) -> None:
        with self._queue_lock:
            if self._queue:
                self._queue[0].turn.set()  # the oldest waiting: commit the next batch
