"""The leader lease and its fence on a real PostgreSQL: two stores on one database, as two
daemons on two machines. What a stale leader could or could not write is read back from
the database with a connection of its own, never from the store under test."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from patchd.state import pglease
from patchd.state.leader import (
    Change,
    Fence,
    LeaderLoop,
    Leadership,
    LeaseTimes,
    NotLeader,
    Role,
    new_holder,
)
from patchd.state.pglease import PgLease
from patchd.state.postgres import PostgresStore
from patchd.states import TargetState

# The shortest takeover the settings allow: the lease lasts 1.8 s of the database's clock.
TIMES = LeaseTimes.for_takeover(3.0)
AT = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


class FrozenClock:
    """A monotonic clock that moves only when told: the node's own view of time. Frozen,
    it models a leader that checked its lease locally and then paused (GC, SIGSTOP) before
    its write reached the database: only the database's fence can stop that write."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """One daemon's share of the HA machinery: its store, lease, leadership and loop."""

    def __init__(
        self, url: str, name: str, clock: Any = time.monotonic, times: LeaseTimes = TIMES
    ) -> None:
        self.store = PostgresStore(url, outage_wait=5)
        self.changes: list[Change] = []
        self.leadership = Leadership(new_holder(name), times)
        self.loop = LeaderLoop(self.leadership, PgLease(self.store), clock, self.changes.append)
        self.store.set_fence(self.loop.fence, self.loop.refused)

    def close(self) -> None:
        self.store.close()


def journal_rows(url: str) -> list[tuple[str, str, int | None]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT target, step, epoch FROM journal ORDER BY seq").fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def lease_row(url: str) -> tuple[str, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT holder, epoch FROM ha_lease WHERE name = 'leader'").fetchone()
    assert row is not None
    return row[0], row[1]


def record(node: Node, target: str, step: str) -> None:
    node.store.record("run-1", target, target, TargetState.APPLYING, AT, step=step, phase="intent")


def test_a_leader_whose_lease_was_taken_over_cannot_write(pg_url: str) -> None:
    frozen = FrozenClock()
    a = Node(pg_url, "node-a", frozen)
    b = Node(pg_url, "node-b")
    try:
        a.loop.step()
        assert a.leadership.role is Role.LEADER and a.leadership.epoch == 1
        a.store.start_run("run-1", "web", None, AT)
        record(a, "c1", "apply-before")

        # b, a standby, cannot take a live lease, and a standby's writes are refused.
        b.loop.step()
        assert b.leadership.role is Role.STANDBY
        with pytest.raises(NotLeader):
            record(b, "c2", "by-standby")

        # a "pauses": no renewal; its own clock stands still, so it still believes it
        # leads. Once the lease has expired by the database's clock, b takes it.
        deadline = time.monotonic() + 10
        while b.leadership.role is not Role.LEADER:
            assert time.monotonic() < deadline, b.leadership.reason
            time.sleep(max(0.05, b.loop.step()))
        assert b.leadership.epoch == 2
        assert b.changes[-1].previous_holder == a.leadership.holder

        # a resumes: its write is refused by the database, and it steps down at once.
        assert a.loop.fence() == Fence(a.leadership.holder, 1)  # its own check passes
        with pytest.raises(NotLeader, match=r"epoch 1\) is no longer valid"):
            record(a, "c1", "apply-after-takeover")
        assert a.leadership.role is Role.STANDBY
        assert a.changes[-1].role is Role.STANDBY
        with pytest.raises(NotLeader, match="not the leader"):
            a.store.finish_run("run-1", "completed", AT, 1, 1, 0, {})

        record(b, "c1", "reconciled-by-b")
    finally:
        a.close()
        b.close()

    # Proven from the database: nothing of a's after the takeover, b's row under epoch 2.
    assert journal_rows(pg_url) == [("c1", "apply-before", 1), ("c1", "reconciled-by-b", 2)]
    assert lease_row(pg_url)[1] == 2
    with psycopg.connect(pg_url) as conn:
        run = conn.execute("SELECT status FROM runs WHERE id = 'run-1'").fetchone()
    assert run == ("running",)


def test_a_write_in_flight_during_a_takeover_lands_before_it(pg_url: str) -> None:
    """The fence locks the lease row FOR SHARE: a takeover waits for a write that passed
    the fence, so that write is ordered before the takeover; after the takeover, the same
    check refuses."""
    store = PostgresStore(pg_url)
    try:
        view = PgLease(store).acquire("old", 0.5)
        assert (view.holder, view.epoch) == ("old", 1)
        time.sleep(0.6)  # expired: free for a taker
        with psycopg.connect(pg_url, autocommit=True) as writer:
            writer.execute("BEGIN")
            writer.execute("INSERT INTO meta (key, value) VALUES ('probe', 'x')")
            # The fence needs an unexpired lease: this writer's lease ran out, so first
            # renew it (same epoch) the way its leader loop would.
            PgLease(store).renew(Fence("old", 1), 30)
            pglease.check_fence(writer, Fence("old", 1))
            taken: list[Any] = []
            taker = threading.Thread(
                target=lambda: taken.append(_force_takeover(pg_url, "new")), daemon=True
            )
            taker.start()
            taker.join(1.0)
            assert taker.is_alive(), "the takeover did not wait for the write in flight"
            writer.execute("COMMIT")
            taker.join(10)
            assert taken == [2]
            with pytest.raises(NotLeader), writer.transaction():
                pglease.check_fence(writer, Fence("old", 1))
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'probe'").fetchone() == ("x",)


def _force_takeover(url: str, holder: str) -> int:
    """What an operator (or a takeover after expiry) does: raise the epoch for `holder`."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "UPDATE ha_lease SET holder = %s, epoch = epoch + 1, expires = clock_timestamp()"
            " + interval '30 seconds' WHERE name = 'leader' RETURNING epoch",
            (holder,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_two_standbys_at_once_make_one_leader(pg_url: str) -> None:
    nodes = [Node(pg_url, f"node-{i}") for i in range(4)]
    try:
        barrier = threading.Barrier(len(nodes))

        def contend(node: Node) -> None:
            barrier.wait()
            node.loop.step()

        threads = [threading.Thread(target=contend, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        leaders = [n for n in nodes if n.leadership.role is Role.LEADER]
        assert len(leaders) == 1
        assert lease_row(pg_url) == (leaders[0].leadership.holder, 1)
    finally:
        for n in nodes:
            n.close()


def test_a_leader_that_steps_down_hands_over_at_once(pg_url: str) -> None:
    a = Node(pg_url, "node-a")
    b = Node(pg_url, "node-b")
    try:
        a.loop.step()
        b.loop.step()
        assert (a.leadership.role, b.leadership.role) == (Role.LEADER, Role.STANDBY)
        # The standby waits for the lease's end: at most its remaining time.
        assert b.leadership.next_at - time.monotonic() <= TIMES.ttl + 0.1
        t0 = time.monotonic()
        a.loop.step_down()
        assert a.changes[-1].reason == "stepped down: shutting down"
        b.leadership.next_at = 0  # as if its wait ended now
        b.loop.step()
        assert b.leadership.role is Role.LEADER
        assert time.monotonic() - t0 < 1.0
    finally:
        a.close()
        b.close()


def test_the_loop_renews_and_a_dead_leader_is_replaced_within_the_takeover(pg_url: str) -> None:
    """Real threads and real time: a leads and renews; it dies (its loop stops without a
    step-down, as kill -9); b leads within ha.takeover."""
    times = LeaseTimes.for_takeover(6.0)  # real renewals on a loaded machine: some slack
    a = Node(pg_url, "node-a", times=times)
    b = Node(pg_url, "node-b", times=times)
    threads = [threading.Thread(target=n.loop.run, daemon=True) for n in (a, b)]
    try:
        threads[0].start()
        _wait(lambda: a.leadership.role is Role.LEADER, 5)
        threads[1].start()
        time.sleep(times.ttl * 2)  # several renewals: a keeps the lease
        assert a.leadership.role is Role.LEADER and b.leadership.role is Role.STANDBY
        assert lease_row(pg_url) == (a.leadership.holder, 1)

        a.loop.step_down = lambda: None  # type: ignore[method-assign]  # dies: no release
        died = time.monotonic()
        a.loop.stop()
        threads[0].join(5)
        _wait(lambda: b.leadership.role is Role.LEADER, times.takeover + 2)
        took = time.monotonic() - died
        assert took <= times.takeover, took
        assert lease_row(pg_url) == (b.leadership.holder, 2)
    finally:
        b.loop.stop()
        threads[1].join(5)
        a.close()
        b.close()


def _wait(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_write_paused_inside_its_transaction_does_not_hold_up_a_takeover(pg_url: str) -> None:
    """A leader frozen between its fence check and its COMMIT holds the lease row FOR
    SHARE. The store's sessions set idle_in_transaction_session_timeout, so the server
    ends that session, the lock goes, and a standby takes the expired lease."""
    store = PostgresStore(pg_url)
    try:
        lease = PgLease(store)
        view = lease.acquire("frozen", 1.0)
        paused = store._connect()  # a session as the store makes them
        paused.execute("BEGIN")
        pglease.check_fence(paused, Fence("frozen", view.epoch))
        paused.execute("INSERT INTO meta (key, value) VALUES ('half', 'done')")
        t0 = time.monotonic()
        time.sleep(1.1)  # the lease has expired; the frozen session still holds its lock
        taken = lease.acquire("standby", 10.0)  # waits for the server to end that session
        waited = time.monotonic() - t0
        assert (taken.holder, taken.epoch) == ("standby", 2)
        assert waited < 4.0, waited
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            paused.execute("COMMIT")
        assert paused.broken
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'half'").fetchone() is None
