"""Whether this thread may touch a target now: the fence of side effects.

With leadership on (several daemons on one PostgreSQL store), only the leader may touch a
target, and only while its lease holds by its own clock (state/leader.py's `may_act`).
The engine checks before each step, but one step is several calls to a backend's service
(the Docker backend's apply stops, renames, creates and starts); a leader paused in the
middle of a step and woken after a takeover must not make the calls it has left. So the
engine and the reconciliation run their backend calls under `guard(may_act)`, and a
backend asks `check()` before each call that changes something: the process-wide rule is
per thread, and a thread without a guard (SQLite, no leadership) is never refused.

A leaf module: the backends (below the state layer) read it, the engine sets it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["NotActing", "check", "guard"]

_local = threading.local()


class NotActing(Exception):
    """This process no longer leads: the call was not made (the target is left for the
    new leader's reconciliation)."""


@contextmanager
def guard(may_act: Callable[[], bool] | None) -> Iterator[None]:
    """Within the block, `check()` in this thread asks `may_act` (None: no fence)."""
    before = getattr(_local, "may_act", None)
    _local.may_act = may_act
    try:
        yield
    finally:
        _local.may_act = before


def check(what: str = "touch a target") -> None:
    """NotActing unless this thread may touch a target now."""
    may_act = getattr(_local, "may_act", None)
    if may_act is not None and not may_act():
        raise NotActing(f"not done: this node no longer holds the leader lease ({what})")
