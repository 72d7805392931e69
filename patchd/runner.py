"""One run of a group for real: its gates, the per-group lock, retained items.

The runtime calls it for both front doors (`patchd run` and the daemon), so both apply
the same rules: the window (unless `--now`), freezes (unless `--force`), the stage gate
(always), the alert gate (`health.prometheus`, always), and one run of a group at a time
across processes (a lock file in the state directory), and an operator's pause (before
the run, and before each new target: targets in flight finish) and quarantined versions
(patchd.engine.controls). A shut gate is a `Refusal`: its
reason and, when time alone opens it, the instant to retry at.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from patchd import acting, health
from patchd.backends.base import Backend, Target
from patchd.config.settings import Group, Settings
from patchd.engine import GateResult, RunRequest, RunResult, run_group, stage_gate
from patchd.engine.controls import pause_of
from patchd.engine.target import Observer, Probe, TargetOutcome
from patchd.state import Store, StoreError
from patchd.windows import in_freeze, may_start

# How often a run held by a pause (and no alert gate) looks whether it was resumed.
PAUSE_RECHECK = 1.0


@dataclass(frozen=True)
class Refusal:
    """Why a run may not start now, and the instant it may be tried again.

    retry_at is set only when the gate that refused opens by time alone and the window
    still allows a start then (a later stage's soak ending inside the window). None means
    the window's own next opening starts it again (window shut, past its cutoff, frozen),
    or nothing will by time alone (another run holds the group, an earlier stage failed).
    """

    reason: str
    retry_at: datetime | None = None

    def __str__(self) -> str:
        return self.reason


class RunRefused(Exception):
    """The run may not start now; carries the Refusal (the message is its reason)."""

    def __init__(self, refusal: Refusal | str) -> None:
        self.refusal = refusal if isinstance(refusal, Refusal) else Refusal(refusal)
        super().__init__(self.refusal.reason)


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def hand_over(*paths: Path) -> None:
    """Give files root has just created in a directory of patchd's (the state directory,
    the control socket's) to the directory's owner (the service user): else the service
    can no longer open its journal or locks."""
    if os.geteuid() != 0:
        return
    for path in paths:
        owner = path.parent.stat()
        # SQLite gives its -wal and -shm files the owner of the database file when root
        # creates them later; these may exist already.
        for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if owner.st_uid != 0 and each.exists():
                os.chown(each, owner.st_uid, owner.st_gid)


@contextmanager
def group_lock(settings: Settings, group: str) -> Iterator[None]:
    """Hold the group's lock file, or raise RunRefused if another run holds it (StoreError
    if the state directory cannot be written)."""
    locks = settings.daemon.state_dir / "locks"
    lock = locks / f"{group}.lock"
    try:
        new = not lock.exists()
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        if new:
            hand_over(locks, lock)
    except OSError as err:
        raise StoreError(f"cannot take the lock of group {group!r}: {err}") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunRefused(f"group {group!r} is already being run") from None
        yield
    finally:
        os.close(fd)


@dataclass
class Runner:
    settings: Settings
    store: Store
    backends: dict[str, Backend]
    observer: Observer
    clock: Callable[[], datetime]
    on_progress: Callable[[TargetOutcome, int, int], None] | None = None
    # Every answer of a group's alert gate: (group, check, answer), check being
    # "before_start" (the engine asks before targets start) or "after_patch" (the probe).
    on_alert_gate: Callable[[str, str, GateResult], None] | None = None
    # Leadership (a shared store): whether this node may touch targets now; None: always.
    may_act: Callable[[], bool] | None = None

    def alert_gate(self, group: Group) -> tuple[Callable[[], GateResult] | None, Probe]:
        """The group's pre-start alert gate (None without `health.prometheus`) and its
        post-patch probe, both reporting their answers to `on_alert_gate`."""
        check = group.health.prometheus
        if check is None:
            return None, health.probe

        def report(kind: str, answer: GateResult) -> GateResult:
            if self.on_alert_gate is not None:
                self.on_alert_gate(group.name, kind, answer)
            return answer

        def before_start() -> GateResult:
            return report("before_start", health.ask_gate(check))

        def after_patch(answer: GateResult) -> None:
            report("after_patch", answer)

        def probe(target: Target, facts: Mapping[str, str], grp: Group) -> None:
            health.probe(target, facts, grp, after_patch)

        return before_start, probe

    def pause_gate(
        self, group: Group, alert_gate: Callable[[], GateResult] | None
    ) -> Callable[[], GateResult]:
        """The gate asked before targets start: shut while the group is paused (targets
        in flight finish; the run waits for `resume` or the pause's end), else the alert
        gate's answer."""

        def gate() -> GateResult:
            try:
                paused = pause_of(self.store, group.name, self.clock())
            except StoreError as err:  # cannot tell: hold, as a shut gate would
                return GateResult(False, "paused", f"the journal cannot be read: {err}")
            if paused is not None:
                return GateResult(False, "paused", paused.describe())
            return alert_gate() if alert_gate is not None else GateResult(True)

        return gate

    def gate(self, group: Group, now: bool, force: bool) -> Callable[[datetime], bool]:
        settings = self.settings
        window = settings.windows[group.window]
        if force:
            return lambda at: True
        if now:
            return lambda at: in_freeze(at, settings.freezes) is None
        return lambda at: may_start(window, at, settings.freezes)

    def run(
        self,
        group: Group | str,
        *,
        now: bool = False,
        force: bool = False,
        stop: threading.Event | None = None,
    ) -> RunResult:
        """One run of the group; RunRefused when a gate is shut before it starts."""
        if isinstance(group, str):
            group = self.settings.groups[group]
        at = self.clock()
        may = self.gate(group, now, force)
        if not may(at):
            freeze = in_freeze(at, self.settings.freezes)
            if freeze is not None:
                raise RunRefused(
                    f"freeze {freeze.name!r} is in force until {freeze.end:%Y-%m-%d %H:%M}Z"
                )
            raise RunRefused(
                f"window {group.window!r} does not allow a start now (closed or past its cutoff)"
            )
        paused = pause_of(self.store, group.name, at)
        if paused is not None:  # even --force: an operator said so; `patchd resume` ends it
            retry_at = paused.until if paused.until is not None and may(paused.until) else None
            raise RunRefused(Refusal(f"group {group.name!r} is {paused.describe()}", retry_at))
        stage = stage_gate(group, self.store, at)
        if not stage.open:
            retry_at = stage.opens_at
            if retry_at is not None and not may(retry_at):
                retry_at = None  # the window's next opening starts the earlier stage first
            raise RunRefused(Refusal(stage.reason, retry_at))
        backend = self.backends[group.backend]
        alert_gate, probe = self.alert_gate(group)
        check = group.health.prometheus
        recheck = check.interval.total_seconds() if check else PAUSE_RECHECK
        with group_lock(self.settings, group.name):
            result = run_group(
                RunRequest(
                    run_id=new_run_id(at),
                    group=group,
                    backend=backend,
                    store=self.store,
                    clock=self.clock,
                    may_start=may,
                    observer=self.observer,
                    window=group.window,
                    pins=stage.pins,
                    probe=probe,
                    stop=stop or threading.Event(),
                    on_progress=self.on_progress,
                    gate=self.pause_gate(group, alert_gate),
                    gate_recheck=recheck,
                    may_act=self.may_act,
                )
            )
        return result

    def release_expired(self) -> int:
        """Remove what commits kept and whose time is up; returns how many were released."""
        count = 0
        for row in self.store.retained(due_by=self.clock()):
            backend = self.backends.get(row.backend)
            if backend is None:
                continue  # that backend left the config; keep the record for a person
            if self.may_act is not None and not self.may_act():
                break  # no longer the leader: the next one releases the rest
            with acting.guard(self.may_act):
                backend.release(row.data)
            self.store.released(row.id)
            count += 1
        return count
