"""Named fault points: crash or fail patchd at a chosen step, for tests only.

A test sets `PATCHD_TEST_FAULTS=1` (nothing else turns this on) and
`PATCHD_FAULTS="POINT=ACTION[@N][,...]"`:

- POINT is a name passed to `hit()`, such as `docker.after_stop` or
  `journal.after.applying` (the full list is `POINTS`, and the README has it);
- ACTION is `crash` (the process ends at once with `os._exit(CRASH_EXIT)`, as kill -9
  would end it: no cleanup, no flush, no journal row) or `raise` (the step raises
  `FaultInjected`, an ordinary error the engine handles like any backend failure; at
  `journal.before.STATE` it stands for a journal write that failed, and at
  `journal.after.STATE` it is refused: the write happened, so only a crash is real);
- `@N` fires on the N-th time the point is reached in this process (default 1); later
  hits pass.

Without the test flag the variable is ignored entirely, so a stray PATCHD_FAULTS in a
production environment changes nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping

from patchd.states import JOURNALED

ENABLE = "PATCHD_TEST_FAULTS"
SPEC = "PATCHD_FAULTS"
CRASH_EXIT = 86  # distinctive, so a test can tell an injected crash from a real one

# Every point patchd reaches; `journal.before.STATE` / `journal.after.STATE` exist for
# every state the engine journals (states.JOURNALED, the machine of engine/target.py).
POINTS = frozenset(
    {
        *(f"journal.{when}.{state}" for when in ("before", "after") for state in JOURNALED),
        "engine.after_snapshot",  # the snapshot is taken, "snapshotted" not yet written
        "engine.after_apply",  # the patch is in, "applied" not yet written
        "engine.during_verify",  # between the backend's health check and the probes
        "engine.after_commit",  # commit is done, "committed" not yet written
        "engine.after_rollback",  # rollback is done, "rolled_back" not yet written
        "docker.after_stop",  # the old container is stopped, not yet renamed
        "docker.after_rename",  # the old container is stopped and renamed
        "docker.after_create",  # the new container exists, not yet started
        "docker.after_start",  # the new container is started
        "docker.during_commit",  # the old container is removed, the tag not yet moved
        "docker.during_rollback",  # the new container is removed, the old not renamed back
        "vsphere.after_snapshot_task",  # the snapshot task finished
        "vsphere.during_commit",  # the version attribute is written, snapshot not removed
        "vsphere.during_rollback",  # the revert task finished, the snapshot not removed
    }
)
ACTIONS = ("crash", "raise")


class FaultInjected(Exception):
    """Raised at a fault point whose action is `raise`."""


class FaultSpecError(ValueError):
    pass


def parse(spec: str) -> dict[str, tuple[str, int]]:
    """`POINT=ACTION[@N],...` -> {point: (action, n)}; unknown names are an error."""
    plan: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, sep, rest = item.partition("=")
        action, _, nth = rest.partition("@")
        if not sep or point not in POINTS or action not in ACTIONS:
            raise FaultSpecError(
                f"{SPEC}: bad item {item!r} (POINT=crash|raise[@N]; points: "
                f"{', '.join(sorted(POINTS))})"
            )
        if action == "raise" and point.startswith("journal.after."):
            raise FaultSpecError(f"{SPEC}: {point} can only crash (the write happened)")
        try:
            n = int(nth) if nth else 1
        except ValueError:
            raise FaultSpecError(f"{SPEC}: bad count in {item!r}") from None
        if n < 1:
            raise FaultSpecError(f"{SPEC}: count must be at least 1 in {item!r}")
        plan[point] = (action, n)
    return plan


class Faults:
    """The armed fault points of this process, and how often each was reached."""

    def __init__(self, plan: Mapping[str, tuple[str, int]]) -> None:
        self.plan = dict(plan)
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()

    def hit(self, point: str) -> None:
        if point not in POINTS:
            raise AssertionError(f"unknown fault point {point!r}")
        armed = self.plan.get(point)
        if armed is None:
            return
        with self._lock:
            self.hits[point] = count = self.hits.get(point, 0) + 1
        action, nth = armed
        if count != nth:
            return
        if action == "crash":
            sys.stderr.write(f"patchd: fault point {point}: crashing\n")
            sys.stderr.flush()
            os._exit(CRASH_EXIT)
        raise FaultInjected(f"fault point {point}")


def from_environment(env: Mapping[str, str] | None = None) -> Faults:
    env = os.environ if env is None else env
    if env.get(ENABLE) != "1":
        return Faults({})
    return Faults(parse(env.get(SPEC, "")))


_active: Faults | None = None


def active() -> Faults:
    global _active
    if _active is None:
        _active = from_environment()
    return _active


def hit(point: str) -> None:
    """Mark that patchd reached `point`; crashes or raises if a test armed it."""
    faults = active()
    if faults.plan:
        faults.hit(point)
