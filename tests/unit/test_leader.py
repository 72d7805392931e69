"""Leadership logic (patchd/state/leader.py) on a fake clock.

The lease's storage here is `MemoryLease`, a stand-in for PostgreSQL that keeps the same
rules as pglease.py's SQL (take only a free or expired lease and raise the epoch; renew
only your own epoch; times by the one shared clock). The SQL itself is tested on the
lab's PostgreSQL in tests/postgres/test_fencing.py.
"""

from __future__ import annotations

import random

import pytest

from patchd.state.base import StoreError
from patchd.state.leader import (
    Change,
    Fence,
    LeaderLoop,
    Leadership,
    LeaseTimes,
    LeaseView,
    NotLeader,
    Role,
    Step,
    new_holder,
)

TIMES = LeaseTimes.for_takeover(15)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MemoryLease:
    """The lease row's rules, in memory, on `clock` (the database's clock)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.holder = ""
        self.epoch = 0
        self.expires: float | None = None
        self.renewed = 0.0
        self.down = False  # the database does not answer

    def _view(self) -> LeaseView:
        now = self.clock()
        remaining = -1.0 if self.expires is None else self.expires - now
        return LeaseView(self.holder, self.epoch, remaining, now - self.renewed)

    def _check(self) -> None:
        if self.down:
            raise StoreError("state store postgresql://x/db: connection refused")

    def acquire(self, holder: str, ttl: float) -> LeaseView:
        self._check()
        now = self.clock()
        if self.expires is None or self.expires <= now:
            self.holder, self.epoch = holder, self.epoch + 1
            self.expires, self.renewed = now + ttl, now
        return self._view()

    def renew(self, fence: Fence, ttl: float) -> LeaseView:
        self._check()
        if (self.holder, self.epoch) == (fence.holder, fence.epoch):
            self.expires, self.renewed = self.clock() + ttl, self.clock()
        return self._view()

    def release(self, fence: Fence) -> None:
        self._check()
        if (self.holder, self.epoch) == (fence.holder, fence.epoch):
            self.expires = self.clock()

    def read(self) -> LeaseView:
        self._check()
        return self._view()


def loop(name: str, lease: MemoryLease, clock: Clock) -> tuple[LeaderLoop, list[Change]]:
    changes: list[Change] = []
    leadership = Leadership(new_holder(name, pid=1), TIMES)
    return LeaderLoop(leadership, lease, clock, changes.append), changes


# --- timing ----------------------------------------------------------------------------


def test_times_derive_from_the_takeover() -> None:
    assert TIMES.ttl == pytest.approx(9.0)
    assert TIMES.renew_every == pytest.approx(3.0)
    assert TIMES.poll_every == pytest.approx(4.5)
    # a dead leader's lease runs out, and the standby's next try comes, within the takeover
    assert TIMES.ttl + TIMES.poll_every <= 0.9 * TIMES.takeover + 1e-9
    assert TIMES.margin == pytest.approx(0.9)


def test_a_takeover_below_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match=r"ha\.takeover must be at least 3s, not 2s"):
        LeaseTimes.for_takeover(2)


def test_holders_are_unique_per_process() -> None:
    assert new_holder("n1", pid=7).startswith("n1/7/")
    assert new_holder("n1", pid=7) != new_holder("n1", pid=7)


# --- the pure state --------------------------------------------------------------------


def test_a_new_leadership_is_a_standby_that_may_not_write() -> None:
    state = Leadership("me", TIMES)
    assert state.role is Role.STANDBY
    assert state.next_step() == (Step.ACQUIRE, 0.0)
    assert not state.may_act(0)
    with pytest.raises(NotLeader, match="not the leader"):
        state.fence(0)


def test_acquiring_counts_the_lease_from_when_the_request_was_sent() -> None:
    state = Leadership("me", TIMES)
    state.leader_seen = "other"
    change = state.acquire_answered(LeaseView("me", 4, 9.0, 0.0), sent_at=50.0)
    assert change == Change(Role.LEADER, 4, "took the lease at epoch 4", "other")
    assert state.fence(50.0) == Fence("me", 4)
    # The database stamped the lease after the request was sent: counted from sent_at,
    # the leader stops first. It renews every ttl/3.
    assert state.deadline == pytest.approx(50.0 + 9.0 - 0.9)
    assert state.next_step() == (Step.RENEW, pytest.approx(53.0))
    assert state.may_act(58.0)
    assert not state.may_act(58.1)
    with pytest.raises(NotLeader, match=r"not renewed for 8\.1s"):
        state.fence(58.1)


def test_a_standby_tries_again_just_after_the_lease_ends() -> None:
    state = Leadership("me", TIMES)
    assert state.acquire_answered(LeaseView("other", 2, 1.5, 7.5), sent_at=10.0) is None
    assert state.next_step() == (Step.ACQUIRE, pytest.approx(11.55))
    assert state.reason == "standby: other leads (epoch 2)"
    # A lease just renewed: try again after renew_every (3 s), not its whole remaining
    # time: a leader that shut down cleanly released it.
    state.acquire_answered(LeaseView("other", 2, 9.0, 0.0), sent_at=20.0)
    assert state.next_step() == (Step.ACQUIRE, pytest.approx(23.0))


def test_a_renewal_refused_steps_down_with_the_taker_named() -> None:
    state = Leadership("me", TIMES)
    state.acquire_answered(LeaseView("me", 1, 9.0, 0.0), sent_at=0.0)
    change = state.renew_answered(LeaseView("other", 2, 9.0, 0.0), sent_at=3.0)
    assert change == Change(Role.STANDBY, 1, "lease of epoch 1 was taken over by other (epoch 2)")
    assert not state.may_act(3.0)


def test_an_unanswered_renewal_keeps_the_leader_until_its_deadline() -> None:
    state = Leadership("me", TIMES)
    state.acquire_answered(LeaseView("me", 1, 9.0, 0.0), sent_at=0.0)
    assert state.unanswered(3.0, "connection refused") is None
    assert state.role is Role.LEADER
    assert state.next_step() == (Step.RENEW, pytest.approx(3.5))  # retried soon
    change = state.unanswered(8.1, "connection refused")
    assert change is not None and change.role is Role.STANDBY
    assert "the database did not answer for 8.1s (connection refused)" in change.reason


def test_a_fenced_write_steps_down_at_once() -> None:
    state = Leadership("me", TIMES)
    assert state.fenced("refused", 0.0) is None  # a standby has nothing to give up
    state.acquire_answered(LeaseView("me", 3, 9.0, 0.0), sent_at=0.0)
    change = state.fenced("epoch 3 is no longer valid", 1.0)
    assert change == Change(Role.STANDBY, 3, "a write was refused: epoch 3 is no longer valid")


# --- the loop --------------------------------------------------------------------------


def run_until(clock: Clock, loops: list[LeaderLoop], end: float, alive: set[int]) -> None:
    """Advance the fake clock from due step to due step of the live loops."""
    while True:
        due = min(lp.leadership.next_step()[1] for i, lp in enumerate(loops) if i in alive)
        if due > end:
            clock.now = end
            return
        clock.now = max(clock.now, due)
        for i, lp in enumerate(loops):
            if i in alive:
                lp.step()


def test_one_leader_renews_and_the_standby_stays_idle() -> None:
    clock = Clock()
    lease = MemoryLease(clock)
    (a, a_changes), (b, b_changes) = loop("a", lease, clock), loop("b", lease, clock)
    run_until(clock, [a, b], clock.now + 600, {0, 1})
    assert a.leadership.role is Role.LEADER and b.leadership.role is Role.STANDBY
    assert [c.role for c in a_changes] == [Role.LEADER]
    assert b_changes == []
    assert lease.epoch == 1
    assert a.leadership.lease_age(clock()) is not None
    assert a.leadership.lease_age(clock()) <= TIMES.renew_every  # type: ignore[operator]


@pytest.mark.parametrize("seed", range(20))
def test_a_dead_leader_is_replaced_within_the_takeover(seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    lease = MemoryLease(clock)
    (a, _), (b, b_changes) = loop("a", lease, clock), loop("b", lease, clock)
    run_until(clock, [a, b], clock.now + rng.uniform(0, 30), {0, 1})
    assert a.leadership.role is Role.LEADER
    died = clock.now
    run_until(clock, [a, b], died + TIMES.takeover, {1})  # a is gone (kill -9): no release
    assert b.leadership.role is Role.LEADER, b.leadership.reason
    assert b_changes[-1].previous_holder == a.leadership.holder
    assert lease.epoch == 2


def test_a_paused_leader_fences_itself_before_the_standby_takes_over() -> None:
    clock = Clock()
    lease = MemoryLease(clock)
    (a, a_changes), (b, _) = loop("a", lease, clock), loop("b", lease, clock)
    run_until(clock, [a, b], clock.now + 10, {0, 1})
    paused = clock.now
    # a is paused (SIGSTOP): it does not step. Before b may take the lease, a may no
    # longer act by its own clock; after, b leads.
    for t in (i / 10 for i in range(0, 200)):
        clock.now = paused + t
        if lease.expires is not None and clock.now < lease.expires:
            continue
        assert not a.may_act(), f"a may still act {t:.1f}s into its pause, lease expired"
    run_until(clock, [a, b], paused + 20, {1})
    assert b.leadership.role is Role.LEADER
    # a resumes (SIGCONT): its first renewal finds the lease taken; it steps down.
    with pytest.raises(NotLeader):
        a.fence()
    a.step()
    assert a.leadership.role is Role.STANDBY
    assert "taken over" in a_changes[-1].reason


def test_a_database_outage_shorter_than_the_lease_keeps_the_leader() -> None:
    clock = Clock()
    lease = MemoryLease(clock)
    (a, a_changes), (b, _) = loop("a", lease, clock), loop("b", lease, clock)
    run_until(clock, [a, b], clock.now + 10, {0, 1})
    lease.down = True
    run_until(clock, [a, b], clock.now + 5, {0, 1})
    assert a.leadership.role is Role.LEADER and a.leadership.unreachable
    lease.down = False
    run_until(clock, [a, b], clock.now + 30, {0, 1})
    assert a.leadership.role is Role.LEADER and lease.epoch == 1
    assert len(a_changes) == 1


def test_a_long_database_outage_steps_the_leader_down_then_it_leads_again() -> None:
    clock = Clock()
    lease = MemoryLease(clock)
    (a, a_changes), _ = loop("a", lease, clock), None
    run_until(clock, [a], clock.now + 10, {0})
    lease.down = True
    run_until(clock, [a], clock.now + 20, {0})
    assert a.leadership.role is Role.STANDBY
    assert "did not answer" in a_changes[-1].reason
    lease.down = False
    run_until(clock, [a], clock.now + 10, {0})
    assert a.leadership.role is Role.LEADER and lease.epoch == 2  # a new epoch


def test_a_refused_write_steps_the_loop_down_and_a_stepped_down_leader_releases() -> None:
    clock = Clock()
    lease = MemoryLease(clock)
    (a, a_changes), (b, b_changes) = loop("a", lease, clock), loop("b", lease, clock)
    a.step()
    a.refused("epoch 1 is no longer valid")
    assert a.leadership.role is Role.STANDBY and a_changes[-1].role is Role.STANDBY
    clock.now += 20
    a.step()
    assert a.leadership.role is Role.LEADER
    a.step_down()
    assert a_changes[-1].reason == "stepped down: shutting down"
    b.step()  # the lease was released: no need to wait for it to expire
    assert b.leadership.role is Role.LEADER and b_changes[-1].role is Role.LEADER


def test_run_returns_after_stop_and_releases_the_lease() -> None:
    import threading
    import time

    lease = MemoryLease(Clock())
    lease.clock = time.monotonic  # type: ignore[assignment]
    changes: list[Change] = []
    lp = LeaderLoop(Leadership("me", TIMES), lease, time.monotonic, changes.append)
    thread = threading.Thread(target=lp.run)
    thread.start()
    deadline = time.monotonic() + 5
    while lp.leadership.role is not Role.LEADER:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    lp.stop()
    thread.join(2)
    assert not thread.is_alive()
    assert [c.role for c in changes] == [Role.LEADER, Role.STANDBY]
    assert lease.expires is not None and lease.expires <= time.monotonic()


def test_the_previous_holder_comes_from_the_database_when_it_says() -> None:
    state = Leadership("me", TIMES)  # a new process: it never saw the old leader
    view = LeaseView("me", 7, 9.0, 0.0, previous="old/1/ab")
    change = state.acquire_answered(view, sent_at=0.0)
    assert change is not None and change.previous_holder == "old/1/ab"
