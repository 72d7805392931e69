"""Waiting until something holds or a deadline passes: the one poll loop of patchd.

Every wait on the outside world (a health endpoint, a vCenter task, VMware Tools, a host
coming back from its reboot) asks at least once, sleeps between asks (never past the
deadline, so the last ask comes AT it), and gives up with the caller's own error once
an ask finds the deadline passed. Deadlines are instants of the Clock's monotonic time.
The clock and the sleep are injected (`Clock`), so unit tests run without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Clock:
    """Monotonic seconds and a sleep; tests pass a fake pair."""

    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def deadline(self, seconds: float) -> float:
        return self.monotonic() + seconds


SYSTEM = Clock()


def backoff(first: float, most: float) -> Callable[[int], float]:
    """Pauses that double from `first` up to `most` (for `until`'s `every`)."""
    return lambda tries: min(first * 2.0**tries, most)


def until(
    attempt: Callable[[], T | None],
    deadline: float,
    expired: Callable[[], T],
    every: float | Callable[[int], float] = 0.5,
    clock: Clock = SYSTEM,
) -> T:
    """Call `attempt` until it returns something other than None, and return that.

    When an attempt returns None at or after `deadline`, return `expired()` instead
    (usually it raises the caller's error, naming what was last seen). `every` is the
    pause between attempts, or a function of the number of pauses so far. An attempt
    that raises ends the wait with its error.
    """
    pauses = 0
    while True:
        result = attempt()
        if result is not None:
            return result
        left = deadline - clock.monotonic()
        if left <= 0:
            return expired()
        pause = every(pauses) if callable(every) else every
        clock.sleep(min(pause, left))
        pauses += 1


def steady(
    good: Callable[[], bool],
    stable_for: float,
    deadline: float,
    expired: Callable[[], NoReturn],
    every: float = 0.5,
    clock: Clock = SYSTEM,
) -> None:
    """Return once `good()` has answered True at every ask for `stable_for` seconds; an
    answer False starts the count again. At `deadline`, `expired()` (which raises)."""
    since: float | None = None

    def attempt() -> bool | None:
        nonlocal since
        ok = good()
        now = clock.monotonic()
        if not ok:
            since = None
            return None
        since = now if since is None else since
        return True if now - since >= stable_for else None

    until(attempt, deadline, expired, every, clock)
