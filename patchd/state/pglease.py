"""The leader lease in PostgreSQL: the SQL behind leader.LeaseBackend, and the fence check
that PostgresStore runs in every write transaction.

Every time is the database's clock (clock_timestamp()), never a node's: nodes whose
clocks disagree still agree on when a lease expires. Each method is one short transaction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from patchd.state.leader import Fence, LeaseView, NotLeader

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")


class LeaseDatabase(Protocol):
    """What the lease needs of PostgresStore (typed here so that the store may import
    this module without a circle)."""

    def lease_transaction(self, work: Callable[[psycopg.Connection[Any]], T]) -> T: ...


LEASE = "leader"

_VIEW = (
    "SELECT holder, epoch,"
    " COALESCE(EXTRACT(EPOCH FROM expires - clock_timestamp()), -1)::float8,"
    " COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - renewed), 0)::float8"
    " FROM ha_lease WHERE name = %s"
)

# A standby takes the lease only if it is free or expired, and raises the epoch. Two
# standbys at once: the second waits for the first's row lock, then finds the lease
# unexpired and changes nothing.
_ACQUIRE = (
    "UPDATE ha_lease SET holder = %s, epoch = epoch + 1, acquired = clock_timestamp(),"
    " renewed = clock_timestamp(), expires = clock_timestamp() + make_interval(secs => %s)"
    " WHERE name = %s AND (expires IS NULL OR expires <= clock_timestamp())"
)

# A leader extends its own lease, even one that expired, as long as nobody took it over
# (the epoch is still its own): no other holder acted in between.
_RENEW = (
    "UPDATE ha_lease SET renewed = clock_timestamp(),"
    " expires = clock_timestamp() + make_interval(secs => %s)"
    " WHERE name = %s AND holder = %s AND epoch = %s"
)

_RELEASE = (
    "UPDATE ha_lease SET expires = clock_timestamp()"
    " WHERE name = %s AND holder = %s AND epoch = %s AND expires > clock_timestamp()"
)

# The fence, in each write transaction (its first statement, or pgjournal's CTE `f`).
# FOR SHARE: a takeover's UPDATE waits until this transaction ends, and any transaction
# that checks after the takeover committed sees the new epoch. So each write lands either
# wholly before a takeover (under a valid lease) or is refused.
FENCE_NAMED = (
    "SELECT 1 FROM ha_lease WHERE name = %(lease)s AND holder = %(holder)s"
    " AND epoch = %(epoch)s AND expires > clock_timestamp() FOR SHARE"
)


def _view(row: tuple[Any, ...]) -> LeaseView:
    return LeaseView(holder=row[0], epoch=int(row[1]), remaining=row[2], age=row[3])


def check_fence(conn: psycopg.Connection[Any], fence: Fence, lease: str = LEASE) -> None:
    """Inside a transaction: NotLeader unless the lease still holds `fence`."""
    held = conn.execute(FENCE_NAMED, {"lease": lease, "holder": fence.holder,
                                      "epoch": fence.epoch}).fetchone()  # fmt: skip
    if held is None:
        raise refused(conn, fence, lease)


def refused(conn: psycopg.Connection[Any], fence: Fence, lease: str = LEASE) -> NotLeader:
    """The NotLeader for a write the fence refused, saying who holds the lease now."""
    row = conn.execute(_VIEW, (lease,)).fetchone()
    now = "no lease row" if row is None else _describe(_view(row))
    return NotLeader(
        f"write refused: this node's lease (epoch {fence.epoch}) is no longer valid; {now}"
    )


def _describe(view: LeaseView) -> str:
    if not view.holder:
        return "nobody holds the lease"
    if view.remaining <= 0:
        return f"the lease of {view.holder} (epoch {view.epoch}) has expired"
    return f"{view.holder} holds the lease (epoch {view.epoch})"


class PgLease:
    """leader.LeaseBackend on a PostgresStore's database (its own connection handling,
    retries and errors: each call is one `store.lease_transaction`)."""

    def __init__(self, store: LeaseDatabase, lease: str = LEASE) -> None:
        self.store = store
        self.lease = lease

    def acquire(self, holder: str, ttl: float) -> LeaseView:
        def work(conn: psycopg.Connection[Any]) -> LeaseView:
            # Who held it before (a dead leader's name, for the takeover's log and metric).
            before = conn.execute(
                "SELECT holder FROM ha_lease WHERE name = %s FOR UPDATE", (self.lease,)
            ).fetchone()
            conn.execute(_ACQUIRE, (holder, ttl, self.lease))
            view = self._read(conn)
            if before is None or view.holder != holder:
                return view
            return dataclasses.replace(view, previous=before[0])

        return self.store.lease_transaction(work)

    def renew(self, fence: Fence, ttl: float) -> LeaseView:
        def work(conn: psycopg.Connection[Any]) -> LeaseView:
            conn.execute(_RENEW, (ttl, self.lease, fence.holder, fence.epoch))
            return self._read(conn)

        return self.store.lease_transaction(work)

    def release(self, fence: Fence) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(_RELEASE, (self.lease, fence.holder, fence.epoch))

        self.store.lease_transaction(work)

    def read(self) -> LeaseView:
        return self.store.lease_transaction(self._read)

    def _read(self, conn: psycopg.Connection[Any]) -> LeaseView:
        row = conn.execute(_VIEW, (self.lease,)).fetchone()
        if row is None:  # the migration inserts it; a hand-deleted row is re-created
            conn.execute("INSERT INTO ha_lease (name) VALUES (%s) ON CONFLICT DO NOTHING",
                         (self.lease,))  # fmt: skip
            row = conn.execute(_VIEW, (self.lease,)).fetchone()
        assert row is not None
        return _view(row)
