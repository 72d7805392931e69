"""A shared PostgreSQL store and its leadership, opened from the settings: the one place
the runtime (or the CLI) asks for them. Imported only when `[state] url` is set, so a
daemon on SQLite never loads psycopg.

`open_shared(state)` gives the store; `Ha.start(store, ha, on_change)` puts leadership on
it: the loop thread, the fence on every write, and a `status()` for metrics and
`patchd status`; `leader_of(store)` reads the lease from any node.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from patchd import log
from patchd.config.schema import HaModel, StateModel
from patchd.state.base import Store, StoreError
from patchd.state.leader import (
    Change,
    LeaderLoop,
    Leadership,
    LeaseTimes,
    LeaseView,
    Role,
    new_holder,
)
from patchd.state.pglease import PgLease
from patchd.state.postgres import PostgresStore

# mypy checks here that PostgresStore keeps the whole Store protocol (state/base.py).
STORE_CLASS: type[Store] = PostgresStore


def password_reader(state: StateModel) -> Callable[[], str] | None:
    """Reads the database password at every connection (a rotated one is used), from
    `password_file` or the systemd credential; None when neither is set (libpq's own
    ~/.pgpass, a client certificate or trust then apply)."""
    if state.password_file is not None:
        path = Path(state.password_file)
    elif state.credential is not None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise StoreError(
                f"state.credential {state.credential!r}: $CREDENTIALS_DIRECTORY is not set"
                " (run patchd under systemd with LoadCredential= or SetCredential=)"
            )
        path = Path(directory) / state.credential
    else:
        return None

    def read() -> str:
        try:
            secret = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or type(err).__name__
            raise StoreError(f"cannot read the database password from {path}: {reason}") from None
        if not secret:
            raise StoreError(f"the database password file {path} is empty")
        log.redact(secret)
        return secret

    return read


def open_shared(state: StateModel, *, readonly: bool = False) -> PostgresStore:
    """The PostgreSQL store of `[state]`, migrated (unless readonly); StoreError if not."""
    assert state.url is not None
    return PostgresStore(
        state.url,
        password=password_reader(state),
        readonly=readonly,
        outage_wait=state.outage_wait.total_seconds(),
    )


def leader_of(store: PostgresStore) -> LeaseView:
    """The lease as the database holds it now, for `patchd status` on any node (a
    read-only store will do): holder ("" if never held), epoch, seconds left, age."""
    return PgLease(store).read()


@dataclass(frozen=True)
class HaStatus:
    """Leadership as this node sees it, for metrics and `patchd status`."""

    node: str
    holder: str
    role: Role
    epoch: int
    leader: str  # the lease's holder as last seen ("" if none)
    lease_age: float | None  # leader: seconds since its last renewal
    takeovers: int  # times this process became the leader
    reason: str


class Ha:
    """Leadership running on a shared store: a thread stepping the LeaderLoop."""

    def __init__(
        self, store: PostgresStore, ha: HaModel, on_change: Callable[[Change], None]
    ) -> None:
        self.node = ha.node or socket.gethostname()
        times = LeaseTimes.for_takeover(ha.takeover.total_seconds())
        self.takeovers = 0
        self._on_change = on_change
        self.loop = LeaderLoop(
            Leadership(new_holder(self.node), times), PgLease(store), time.monotonic, self._changed
        )
        store.set_fence(self.loop.fence, self.loop.refused)
        self._thread = threading.Thread(target=self.loop.run, name="patchd-ha", daemon=True)

    @classmethod
    def start(cls, store: PostgresStore, ha: HaModel, on_change: Callable[[Change], None]) -> Ha:
        started = cls(store, ha, on_change)
        started._thread.start()
        return started

    def _changed(self, change: Change) -> None:
        if change.role is Role.LEADER:
            self.takeovers += 1
        self._on_change(change)

    def may_act(self) -> bool:
        """Whether a side effect may start now (checked before touching a target)."""
        return self.loop.may_act()

    def status(self) -> HaStatus:
        # Read without the loop's lock: each field is current, the set may straddle a
        # change of role by a moment (a status line, never a decision).
        state = self.loop.leadership
        return HaStatus(
            node=self.node,
            holder=state.holder,
            role=state.role,
            epoch=state.epoch,
            leader=state.leader_seen,
            lease_age=state.lease_age(time.monotonic()),
            takeovers=self.takeovers,
            reason=state.reason,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Step down (a standby takes over at once) and end the thread."""
        self.loop.stop()
        self._thread.join(timeout)
