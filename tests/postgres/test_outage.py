"""The PostgreSQL store across a database crash: `pg_ctl -m immediate` (no checkpoint, no
goodbye to the clients, WAL replay at the next start) while writers are busy. Every write
that returned must be in the database after the restart, exactly once; writes made during
the outage wait and land once the server is back; a leader's lease survives an outage
shorter than its lease.

These tests stop and start the bed's server itself: they run alone against it."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest

from patchd.state.base import StoreError
from patchd.state.leader import LeaderLoop, Leadership, LeaseTimes, NotLeader, Role, new_holder
from patchd.state.pglease import PgLease
from patchd.state.postgres import PostgresStore
from patchd.states import TargetState
from tests.pglab import PgLab

AT = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
WRITERS = 4


def _writers(
    store: PostgresStore, stop: threading.Event
) -> tuple[list[str], list[str], list[threading.Thread]]:
    returned: list[str] = []  # steps whose record() returned: must be in the database
    failed: list[str] = []
    lock = threading.Lock()

    def write(worker: int) -> None:
        n = 0
        while not stop.is_set():
            step = f"w{worker}-{n}"
            n += 1
            try:
                store.record(
                    "run-1", f"t{worker}", f"t{worker}", TargetState.APPLYING, AT,
                    step=step, phase="intent",
                )  # fmt: skip
            except StoreError:
                with lock:
                    failed.append(step)
                continue
            with lock:
                returned.append(step)

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(WRITERS)]
    for t in threads:
        t.start()
    return returned, failed, threads


def _steps_in_db(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT step FROM journal ORDER BY seq").fetchall()]


@pytest.mark.parametrize("mode", ["immediate", "fast"])
def test_a_database_restart_mid_run_loses_no_returned_write(
    pg: PgLab, pg_url: str, mode: str
) -> None:
    store = PostgresStore(pg_url, outage_wait=60)
    stop = threading.Event()
    try:
        store.start_run("run-1", "web", None, AT)
        returned, failed, threads = _writers(store, stop)
        time.sleep(1.0)
        before = len(returned)
        assert before > 0
        pg.stop(mode)
        stopped_with = len(returned)
        time.sleep(2.0)  # writers wait: nothing returns while the server is down
        assert len(returned) - stopped_with <= WRITERS, "writes returned with no server"
        pg.start()
        deadline = time.monotonic() + 60
        while len(returned) < stopped_with + 50:
            assert time.monotonic() < deadline, "writes did not resume after the restart"
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(30)
        store.finish_run("run-1", "completed", AT, WRITERS, WRITERS, 0, {})
    finally:
        stop.set()
        store.close()
    assert failed == []
    in_db = _steps_in_db(pg_url)
    assert len(in_db) == len(set(in_db)), "a write landed twice"
    missing = set(returned) - set(in_db)
    assert not missing, f"{len(missing)} returned writes lost: {sorted(missing)[:5]}"
    # Each writer's rows are in its own order, with no gap: nothing in between was lost.
    for worker in range(WRITERS):
        mine = [int(s.split("-")[1]) for s in in_db if s.startswith(f"w{worker}-")]
        assert mine == list(range(len(mine)))


def test_a_leader_keeps_its_lease_through_a_short_crash(pg: PgLab, pg_url: str) -> None:
    """A crash shorter than the lease: the leader's renewals fail meanwhile, its writes
    wait, and once the server is back it renews the same epoch and its writes land
    (fenced by that epoch). ha.takeover = 60 s: a lease of 36 s, far longer than the
    restart even on a loaded machine."""
    store = PostgresStore(pg_url, outage_wait=60)
    leadership = Leadership(new_holder("node-a"), LeaseTimes.for_takeover(60))
    loop = LeaderLoop(leadership, PgLease(store), time.monotonic, lambda change: None)
    store.set_fence(loop.fence, loop.refused)
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 10
        while leadership.role is not Role.LEADER:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        store.start_run("run-1", "web", None, AT)
        returned, failed, threads = _writers(store, stop)
        time.sleep(0.5)
        pg.stop("immediate")
        time.sleep(1.0)
        pg.start()
        count = len(returned)
        deadline = time.monotonic() + 30
        while len(returned) < count + 50:
            assert time.monotonic() < deadline, "writes did not resume"
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(30)
        assert leadership.role is Role.LEADER and leadership.epoch == 1
    finally:
        stop.set()
        loop.stop()
        runner.join(10)
        store.close()
    assert failed == []
    with psycopg.connect(pg_url) as conn:
        epochs = {r[0] for r in conn.execute("SELECT DISTINCT epoch FROM journal").fetchall()}
    assert epochs == {1}
    in_db = _steps_in_db(pg_url)
    assert not set(returned) - set(in_db)
    assert len(in_db) == len(set(in_db))


def test_a_database_outage_longer_than_the_lease_stops_writes_then_leads_again(
    pg: PgLab, pg_url: str
) -> None:
    """ha.takeover = 3 s (a lease of 1.8 s) and a 4 s outage: the leader's writes wait, then
    fail as NotLeader once its lease may have run out (not after outage_wait: it must
    not act on a lease it cannot renew), it steps down; when the database is back it
    takes the lease again under a new epoch and its writes land under that epoch."""
    store = PostgresStore(pg_url, outage_wait=60)
    changes: list[str] = []
    leadership = Leadership(new_holder("node-a"), LeaseTimes.for_takeover(3))
    loop = LeaderLoop(leadership, PgLease(store), time.monotonic,
                      lambda change: changes.append(f"{change.role} {change.epoch}"))  # fmt: skip
    store.set_fence(loop.fence, loop.refused)
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while leadership.role is not Role.LEADER:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        store.start_run("run-1", "web", None, AT)
        pg.stop("fast")
        t0 = time.monotonic()
        with pytest.raises(NotLeader):
            store.record("run-1", "t", "t", TargetState.APPLYING, AT, step="in-outage",
                         phase="p")  # fmt: skip
        assert time.monotonic() - t0 < 5, "the write waited past the lease"
        time.sleep(max(0.0, 4 - (time.monotonic() - t0)))
        pg.start()
        deadline = time.monotonic() + 30
        while not (leadership.role is Role.LEADER and leadership.epoch == 2):
            assert time.monotonic() < deadline, leadership.reason
            time.sleep(0.05)
        store.record("run-1", "t", "t", TargetState.APPLYING, AT, step="after", phase="p")
    finally:
        loop.stop()
        runner.join(10)
        store.close()
    assert changes[:3] == ["leader 1", "standby 1", "leader 2"]
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT step, epoch FROM journal ORDER BY seq").fetchall()
    assert rows == [("after", 2)]
