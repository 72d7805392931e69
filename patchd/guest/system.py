"""The machine as a whole: its boot id, a reboot that is waited for, and systemd's verdict
on its health (`systemctl is-system-running`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NoReturn

from patchd import poll
from patchd.backends.base import StepFailed
from patchd.guest.errors import CommandFailed, Unreachable
from patchd.guest.ssh import Session

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
# States in which systemd is still bringing the machine up (or back up).
_STARTING = ("initializing", "starting")


def boot_id(session: Session) -> str:
    return session.run(["cat", _BOOT_ID]).stdout.strip()


def reboot(
    connect: Callable[[], Session],
    session: Session,
    timeout: float,
    clock: poll.Clock = poll.SYSTEM,
) -> str:
    """Reboot the machine and wait until SSH answers again with a new boot id, which
    proves it really went down. Returns the new boot id; StepFailed after `timeout`."""
    before = boot_id(session)
    # The connection dropping under us is what a reboot looks like.
    with contextlib.suppress(CommandFailed, Unreachable):
        session.run(["systemctl", "reboot"], sudo=True, check=False, timeout=30)
    session.close()
    deadline = clock.deadline(timeout)
    last = "no answer yet"

    def back() -> str | None:
        nonlocal last
        try:
            with connect() as fresh:
                now = boot_id(fresh)
        except (Unreachable, CommandFailed) as err:
            last = str(err)
            return None
        if now != before:
            return now
        last = f"still up with the old boot id {before}"
        return None

    def expired() -> NoReturn:
        raise StepFailed(
            f"{session.name}: did not come back from a reboot within {timeout:g}s ({last})"
        )

    clock.sleep(1.0)  # give it a moment to go down before the first ask
    return poll.until(back, deadline, expired, 1.0, clock)


def failed_units(session: Session) -> list[str]:
    result = session.run(
        ["systemctl", "list-units", "--state=failed", "--no-legend", "--plain"], check=False
    )
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def wait_running(
    connect: Callable[[], Session],
    timeout: float,
    settle: float = 5.0,
    clock: poll.Clock = poll.SYSTEM,
) -> None:
    """Wait until `systemctl is-system-running` says running.

    While systemd is starting, keep waiting (a reboot just happened). A machine that stays
    degraded (or in maintenance) for `settle` seconds fails at once with its failed units
    named; an unhealthy state that does not settle fails at `timeout`."""
    deadline = clock.deadline(timeout)
    bad_since: float | None = None
    state = "unknown"
    units: list[str] = []
    name = "?"
    session: Session | None = None  # kept across polls; a new one after a failure

    def failure() -> StepFailed:
        detail = f"; failed units: {', '.join(units)}" if units else ""
        return StepFailed(f"{name}: systemctl is-system-running says {state}{detail}")

    def running() -> bool | None:
        nonlocal bad_since, state, units, name, session
        try:
            if session is None:
                fresh = connect()
                name = fresh.name
                session = fresh.open()
            state = session.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state == "running":
                return True
            units = failed_units(session) if state not in _STARTING else []
        except (Unreachable, CommandFailed) as err:
            state, units = f"unreachable ({err})", []
            if session is not None:
                session.close()
                session = None
        now = clock.monotonic()
        if state in _STARTING or state.startswith("unreachable"):
            bad_since = None
        elif bad_since is None:
            bad_since = now
        if bad_since is not None and now - bad_since >= settle:
            raise failure()
        return None

    def expired() -> NoReturn:
        raise failure()

    try:
        poll.until(running, deadline, expired, 1.0, clock)
    finally:
        if session is not None:
            session.close()
