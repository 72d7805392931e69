"""Group commits of records on PostgreSQL (state/pgjournal.py): a batch of records only is
one statement; a batch with the same target twice (one statement cannot upsert a row
twice) or with another kind of write is one transaction of several. Either way every
write lands, in the order queued, and the later state of a target wins."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from patchd.state.postgres import PostgresStore
from patchd.states import TargetState

AT = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def _queue_in_order(store: PostgresStore, writes: list[Callable[[], None]]) -> None:
    """Queue `writes` one after the other while commits are held, then let them commit."""
    threads = []
    with store._lock:
        for n, write in enumerate(writes, 1):
            threads.append(threading.Thread(target=write))
            threads[-1].start()
            deadline = time.monotonic() + 30
            while len(store._queue) < n:
                assert time.monotonic() < deadline, f"write {n} never queued"
                time.sleep(0.005)
    for thread in threads:
        thread.join(30)


def _record(store: PostgresStore, target: str, step: str, state: TargetState,
            minute: int, **fields: str) -> Callable[[], None]:  # fmt: skip
    at = AT + timedelta(minutes=minute)
    return lambda: store.record("run-1", target, target, state, at, step=step, phase="p",
                                **fields)  # fmt: skip


def test_a_batch_with_a_target_twice_lands_whole_in_order(pg_url: str) -> None:
    store = PostgresStore(pg_url, outage_wait=10)
    commits: list[int] = []  # the size of each batch committed
    real = store._transaction

    def counted(batch: list[object], unsure: list[str]) -> None:
        commits.append(len(batch))
        real(batch, unsure)  # type: ignore[arg-type]

    store._transaction = counted  # type: ignore[method-assign,assignment]
    try:
        store.start_run("run-1", "web", None, AT)
        _queue_in_order(store, [
            _record(store, "t1", "apply", TargetState.APPLYING, 1, version_from="1"),
            _record(store, "t2", "apply", TargetState.APPLYING, 2),
            _record(store, "t1", "verify", TargetState.VERIFYING, 3, version_to="2"),
        ])  # fmt: skip
        assert commits[-1] == 3  # one shared transaction
        assert [s for s, _, _ in store.journal("run-1", "t1")] == ["apply", "verify"]
        assert [s for s, _, _ in store.journal("run-1", "t2")] == ["apply"]
        rows = {r.target: r for r in store.targets("run-1")}
        assert rows["t1"].state is TargetState.VERIFYING
        assert (rows["t1"].version_from, rows["t1"].version_to) == ("1", "2")
        assert rows["t1"].updated == AT + timedelta(minutes=3)
        assert [r.target for r in store.targets("run-1")] == ["t1", "t2"]  # first written first
    finally:
        store.close()


def test_a_batch_of_distinct_targets_keeps_the_order_queued(pg_url: str) -> None:
    store = PostgresStore(pg_url, outage_wait=10)
    try:
        store.start_run("run-1", "web", None, AT)
        targets = [f"t{n}" for n in (5, 1, 4, 2, 3)]
        _queue_in_order(store, [
            _record(store, t, "snapshot", TargetState.SNAPSHOTTING, n)
            for n, t in enumerate(targets)
        ])  # fmt: skip
        assert [r.target for r in store.targets("run-1")] == targets
    finally:
        store.close()
