"""Leadership among daemons that share one PostgreSQL store: a lease row with an epoch.

This module owns every leadership decision: when a standby tries to take the lease, when a
leader renews it, when a leader must stop believing it leads (by its own clock, before the
database says so), and the `Fence` (holder and epoch) that the store checks inside every
write transaction. The SQL that reads and moves the lease is in `pglease.py`.

Why a lease row and not an advisory lock: an advisory lock lives as long as one database
session. A leader that loses its connection loses the lock without knowing it, and a write
it then makes on a new connection is not fenced by anything; a leader paused by SIGSTOP
keeps its session (and so the lock) until TCP gives up, which is far longer than a
takeover may take. A lease row carries an epoch that only grows: a takeover raises it,
and every write of the store runs, in its own transaction, a check that the row still
holds the writer's epoch and has not expired by the database's clock (locking the row
FOR SHARE, so a takeover waits for writes in flight and then fences all later ones). That
holds over reconnects and pauses: whatever the old leader sends after a takeover is
refused by the database itself.

A leader also fences itself: it counts its lease from the instant it SENT the renewal
(the database stamped the expiry later than that), so on its own monotonic clock it stops
acting a margin before any standby can take the lease; a side effect (which the database
cannot refuse) is started only while `may_act` says yes.

Everything here except `LeaderLoop` is pure: the clock is a parameter (monotonic seconds).
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from patchd.state.base import StoreError

__all__ = [
    "Change",
    "Fence",
    "LeaderLoop",
    "Leadership",
    "LeaseBackend",
    "LeaseTimes",
    "LeaseView",
    "NotLeader",
    "Role",
    "Step",
    "new_holder",
]

DEFAULT_TAKEOVER = 15.0
MIN_TAKEOVER = 3.0
# While the database does not answer, a leader retries its renewal this often (its lease
# keeps it leader until its deadline), and a standby its acquisition.
RETRY_UNREACHABLE = 0.5


class NotLeader(StoreError):
    """A write refused because this process does not hold the lease (it is a standby, its
    lease may have expired, or the database's fence refused the write): nothing of it was
    written. A StoreError, so the engine stops as it does for any journal failure."""


def new_holder(node: str, pid: int | None = None) -> str:
    """A holder name unique to this process: node/pid/random. A restarted daemon is a new
    holder, so it never mistakes the lease of its previous life (which may still be alive,
    paused) for its own."""
    return f"{node}/{os.getpid() if pid is None else pid}/{secrets.token_hex(4)}"


@dataclass(frozen=True)
class LeaseTimes:
    """The lease's timing, all derived from one setting, `ha.takeover`: the longest a dead
    leader stays unreplaced.

    A leader dead right after a renewal leaves a lease that expires `ttl` later; a standby
    reads the lease's remaining time and tries again just after it ends, and at least
    every `renew_every` (a released lease is taken then); so takeover <= ttl + poll_every
    (the bound of a standby's wait), with 10 % left for query latency. The leader renews
    every ttl/3, so two lost renewals in a row still leave it leading.
    """

    takeover: float
    ttl: float
    renew_every: float
    poll_every: float
    margin: float  # the leader stops acting this long before its lease could expire

    @classmethod
    def for_takeover(cls, takeover: float = DEFAULT_TAKEOVER) -> LeaseTimes:
        if takeover < MIN_TAKEOVER:
            raise ValueError(f"ha.takeover must be at least {MIN_TAKEOVER:g}s, not {takeover:g}s")
        ttl = 0.6 * takeover
        return cls(
            takeover=takeover,
            ttl=ttl,
            renew_every=ttl / 3,
            poll_every=0.3 * takeover,
            margin=min(1.0, ttl / 10),
        )


@dataclass(frozen=True)
class Fence:
    """What a write carries when leadership is on: it succeeds only while the lease row
    holds this holder and epoch and has not expired."""

    holder: str
    epoch: int


@dataclass(frozen=True)
class LeaseView:
    """The lease row as the database answered an acquire, renew or read (times by the
    database's clock, as seconds relative to its now)."""

    holder: str  # "" if nobody ever held it
    epoch: int
    remaining: float  # seconds until it expires; <= 0: expired
    age: float  # seconds since it was acquired or last renewed
    previous: str = ""  # acquire only: who held the lease before the call ("" if nobody)


class Role(StrEnum):
    STANDBY = "standby"
    LEADER = "leader"


class Step(StrEnum):
    ACQUIRE = "acquire"
    RENEW = "renew"


@dataclass(frozen=True)
class Change:
    """A change of role, with its reason (logged and shown by `status`)."""

    role: Role
    epoch: int
    reason: str
    previous_holder: str = ""  # on election: who held the lease before ("" if nobody)


class Leadership:
    """The role of this process and the reasons for it. Pure: no I/O; every method that
    needs the time takes `now` (monotonic seconds)."""

    def __init__(self, holder: str, times: LeaseTimes) -> None:
        self.holder = holder
        self.times = times
        self.role = Role.STANDBY
        self.epoch = 0
        self.reason = "starting: not yet tried to take the lease"
        self.deadline = 0.0  # leader: acts only before this instant
        self.renewed_at = 0.0  # leader: when the last successful renewal was sent
        self.unreachable = False  # the last attempt failed: the database did not answer
        self.next_at = 0.0  # when the next step is due
        self.leader_seen = ""  # the holder of the lease as last read (for status)

    # --- questions --------------------------------------------------------------------

    def fence(self, now: float) -> Fence:
        """The fence for a write now; NotLeader (with the reason) if this process must not
        write: it is a standby, or its lease may have expired by now."""
        if self.role is not Role.LEADER:
            raise NotLeader(f"not the leader ({self.reason})")
        if now >= self.deadline:
            raise NotLeader(
                f"lease of epoch {self.epoch} not renewed for {now - self.renewed_at:.1f}s;"
                " it may have been taken over"
            )
        return Fence(self.holder, self.epoch)

    def may_act(self, now: float) -> bool:
        """Whether a side effect (touching a target) may start now."""
        return self.role is Role.LEADER and now < self.deadline

    def lease_age(self, now: float) -> float | None:
        """Seconds since the last successful renewal (leader only)."""
        return now - self.renewed_at if self.role is Role.LEADER else None

    def next_step(self) -> tuple[Step, float]:
        """What the loop does next, and at what instant."""
        return (Step.RENEW if self.role is Role.LEADER else Step.ACQUIRE), self.next_at

    # --- outcomes of the loop's steps ------------------------------------------------------

    def acquire_answered(self, view: LeaseView, sent_at: float) -> Change | None:
        """The database answered an acquisition sent at `sent_at`: `view` is the lease
        after it. Returns the Change if this process became the leader."""
        self.unreachable = False
        if view.holder == self.holder and view.remaining > 0:
            previous = view.previous or self.leader_seen
            previous = "" if previous == self.holder else previous
            self._lead(view.epoch, sent_at)
            self.reason = f"took the lease at epoch {view.epoch}"
            self.leader_seen = self.holder
            return Change(Role.LEADER, view.epoch, self.reason, previous)
        self.leader_seen = view.holder if view.remaining > 0 else ""
        # Try again just after the current lease ends (it may be renewed meanwhile), and
        # at least every renew_every: a lease released by a clean shutdown is taken then.
        wait = min(self.times.poll_every, self.times.renew_every)
        if view.remaining > 0:
            wait = min(wait, view.remaining + 0.05)
            self.reason = f"standby: {view.holder} leads (epoch {view.epoch})"
        else:
            wait = min(wait, 0.05)  # expired but not ours: a race with another standby
            self.reason = "standby: the lease is free"
        self.next_at = sent_at + wait
        return None

    def renew_answered(self, view: LeaseView, sent_at: float) -> Change | None:
        """The database answered a renewal sent at `sent_at`: `view` is the lease after it.
        Returns the Change if this process is no longer the leader (taken over)."""
        self.unreachable = False
        if view.holder == self.holder and view.epoch == self.epoch and view.remaining > 0:
            self._lead(self.epoch, sent_at)
            return None
        self.leader_seen = view.holder if view.remaining > 0 else ""
        return self._step_down(
            f"lease of epoch {self.epoch} was taken over by {view.holder} (epoch {view.epoch})",
            sent_at,
        )

    def unanswered(self, now: float, error: str) -> Change | None:
        """The database did not answer a step started at `now`. A leader stays leader until
        its deadline (the store's writes wait for the database meanwhile), then steps down."""
        self.unreachable = True
        if self.role is Role.LEADER and now >= self.deadline:
            return self._step_down(
                f"lease of epoch {self.epoch} expired: the database did not answer"
                f" for {now - self.renewed_at:.1f}s ({error})",
                now,
            )
        if self.role is Role.STANDBY:
            self.reason = f"standby: the database does not answer ({error})"
        self.next_at = now + RETRY_UNREACHABLE
        return None

    def fenced(self, reason: str, now: float) -> Change | None:
        """A write was refused by the database's fence: this process lost the lease."""
        if self.role is not Role.LEADER:
            return None
        return self._step_down(f"a write was refused: {reason}", now)

    def released(self, now: float) -> Change | None:
        """This process gave the lease up (shutdown)."""
        if self.role is not Role.LEADER:
            return None
        return self._step_down("stepped down: shutting down", now)

    def _lead(self, epoch: int, sent_at: float) -> None:
        self.role = Role.LEADER
        self.epoch = epoch
        self.renewed_at = sent_at
        self.deadline = sent_at + self.times.ttl - self.times.margin
        self.next_at = sent_at + self.times.renew_every

    def _step_down(self, reason: str, now: float) -> Change:
        epoch = self.epoch
        self.role = Role.STANDBY
        self.reason = reason
        self.deadline = 0.0
        self.next_at = now + self.times.poll_every
        return Change(Role.STANDBY, epoch, reason)


class LeaseBackend(Protocol):
    """The lease's storage (PgLease in pglease.py). Each method is one short transaction
    stamped by the database's clock; StoreError when the database does not answer."""

    def acquire(self, holder: str, ttl: float) -> LeaseView:
        """Take the lease if it is free or expired (raising its epoch); the lease after."""
        ...

    def renew(self, fence: Fence, ttl: float) -> LeaseView:
        """Extend the lease if it still holds `fence`; the lease after."""
        ...

    def release(self, fence: Fence) -> None:
        """End the lease now if it still holds `fence` (a standby may take it at once)."""
        ...

    def read(self) -> LeaseView:
        """The lease as it is (for status)."""
        ...


class LeaderLoop:
    """Drives a Leadership against a LeaseBackend: one step at a time (`step`), or in a
    thread (`run`). `on_change` is called, outside any lock, with each change of role;
    the runtime reconciles and arms its windows on an election, and stops starting
    anything on a step-down."""

    def __init__(
        self,
        leadership: Leadership,
        backend: LeaseBackend,
        clock: Callable[[], float],
        on_change: Callable[[Change], None],
    ) -> None:
        self.leadership = leadership
        self.backend = backend
        self.clock = clock
        self.on_change = on_change
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set by stop() and refused(): the loop steps now
        self._stopping = False

    def fence(self) -> Fence:
        """For the store: the fence of a write made now (NotLeader if none)."""
        with self._lock:
            return self.leadership.fence(self.clock())

    def may_act(self) -> bool:
        with self._lock:
            return self.leadership.may_act(self.clock())

    def step(self) -> float:
        """Run the step that is due (if any); seconds until the next one."""
        now = self.clock()
        with self._lock:
            what, due = self.leadership.next_step()
            if now < due:
                return due - now
            fence = Fence(self.leadership.holder, self.leadership.epoch)
        ttl = self.leadership.times.ttl
        change: Change | None
        try:
            if what is Step.RENEW:
                view = self.backend.renew(fence, ttl)
                with self._lock:
                    change = self.leadership.renew_answered(view, now)
            else:
                answer = self.backend.acquire(fence.holder, ttl)
                with self._lock:
                    change = self.leadership.acquire_answered(answer, now)
        except StoreError as err:
            with self._lock:
                change = self.leadership.unanswered(now, str(err))
        if change is not None:
            self.on_change(change)
        with self._lock:
            return max(0.0, self.leadership.next_at - self.clock())

    def refused(self, reason: str) -> None:
        """The store saw a write refused by the fence: step down now (not at the next
        renewal), and wake the loop."""
        with self._lock:
            change = self.leadership.fenced(reason, self.clock())
        if change is not None:
            self.on_change(change)
            self._wake.set()

    def run(self) -> None:
        """Step until `stop()` is called (a thread's target); then give the lease up if
        this process holds it. It sleeps until the next step is due: no polling."""
        while True:
            delay = self.step()
            if self._wake.wait(delay):
                self._wake.clear()
            with self._lock:
                if self._stopping:
                    break
        self.step_down()

    def stop(self) -> None:
        """End `run` (which then steps down)."""
        with self._lock:
            self._stopping = True
        self._wake.set()

    def step_down(self) -> None:
        """Give the lease up now (a clean shutdown): a standby takes over at once instead
        of waiting for the lease to expire."""
        with self._lock:
            was_leader = self.leadership.role is Role.LEADER
            fence = Fence(self.leadership.holder, self.leadership.epoch)
        if not was_leader:
            return
        with suppress(StoreError):  # if not, the lease expires by itself
            self.backend.release(fence)
        with self._lock:
            change = self.leadership.released(self.clock())
        if change is not None:
            self.on_change(change)
