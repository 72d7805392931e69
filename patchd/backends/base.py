"""The backend contract: what every backend implements, and the errors it may raise.

A backend registers a class in the `patchd.backends` entry-point group (`patchd.plugins`
owns the registry and the class-level surface, BackendPlugin). The class carries
the pydantic models that validate its `[backends.NAME]` table and a group's `select` table
(so `patchd check-config` checks a backend's keys without connecting to anything), and is
constructed with `(name, config)` to do the work.

The engine drives every target through the same steps, journaling each one BEFORE its side
effect and after it:

    check_update -> plan_snapshot (no side effect; its data is journaled)
                 -> snapshot -> apply -> verify -> commit
                                      \\-> rollback (after any failure past plan_snapshot)

Rules every backend keeps:
- `plan_snapshot` is pure: it names the snapshot (for example `patchd-<run id>`) so that
  after a crash at ANY later instant, `rollback(target, snapshot)` can find what exists and
  put the target back. `rollback` must therefore be idempotent and accept a snapshot that
  was only partly taken.
- A step that cannot tell whether it worked raises `StepFailed` (fail closed).
- `TransientError` means "nothing was changed; the same call may work later".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from patchd.config.schema import HealthModel, PatchModel, SnapshotModel
from patchd.plugins import BackendPlugin

__all__ = [
    "JOURNALED_VERSION",
    "Backend",
    "BackendError",
    "BackendPlugin",
    "KeptSnapshot",
    "LeftOutOfService",
    "ListsSnapshots",
    "NotNow",
    "NotRunning",
    "PreparesRun",
    "Retained",
    "RollbackFailed",
    "Snapshot",
    "StepFailed",
    "Target",
    "TransientError",
    "Update",
]


class BackendError(Exception):
    """Base of the errors a backend raises on purpose."""


class TransientError(BackendError):
    """Nothing was changed and the call may succeed if retried (engine down, timeout)."""


class StepFailed(BackendError):
    """The step failed or its outcome is unknown: the target must be rolled back."""


class NotNow(StepFailed):
    """The target may not start now for a reason outside it (its cluster is halted by
    another host left in maintenance mode). From check_update nothing was changed: the
    engine reports the target pending with this reason, not failed. From a later step it
    is a StepFailed like any other."""


class NotRunning(StepFailed):
    """Raised by check_update's pre-check: the target is stopped or powered off, and
    patchd does not start what a person stopped. Nothing was changed: the engine reports
    it skipped with this reason, not failed, and it spends none of the error budget. From
    a later step it is a StepFailed like any other."""


class LeftOutOfService(BackendError):
    """Raised by rollback when there is no earlier state to return to (an ESXi host) and
    the failed target was safely taken out of service instead (maintenance mode): it is
    reported `out_of_service`, not rolled back; a person fixes it and brings it back."""


class RollbackFailed(BackendError):
    """The target could not be put back; a person must look at it. Nothing is deleted."""


@dataclass(frozen=True)
class Target:
    """One thing patchd patches: a container, a VM or a host."""

    id: str
    name: str
    kind: str
    labels: Mapping[str, str] = field(default_factory=dict)
    # Names of targets of the same run that must be patched before this one.
    depends_on: tuple[str, ...] = ()
    # Targets sharing a partition (an ESXi cluster) count against one concurrency budget.
    partition: str | None = None


@dataclass(frozen=True)
class Update:
    """What patching a target would change.

    `ref` names the artifact independent of version (an image reference like
    `registry/app:1`); `current` and `available` are versions of it (digests). Staged
    promotion pins `ref` to the version staging verified.
    """

    ref: str
    current: str
    available: str


# Restart reconciliation adds this key to the Snapshot.data it hands to commit(): the
# version the journal says was applied, for a backend that otherwise knows it only in the
# process that applied the patch.
JOURNALED_VERSION = "journaled_version"


@dataclass(frozen=True)
class Snapshot:
    """A handle the backend can roll back from; `data` is JSON-able and journaled."""

    target_id: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class Retained:
    """Something kept after a commit, to remove once `keep` has passed."""

    data: Mapping[str, Any]
    keep: timedelta
    description: str = ""


@runtime_checkable
class Backend(Protocol):
    """A connected backend instance: one `[backends.NAME]` table."""

    name: str

    def ping(self) -> None:
        """Raise TransientError when the backend's service cannot be reached."""

    def discover(self, select: BaseModel) -> Sequence[Target]:
        """The targets a group's selectors match, in a stable order. No side effects."""

    def check_update(
        self, target: Target, pins: Mapping[str, str], patch: PatchModel
    ) -> Update | None:
        """The update available for `target`, or None when it is current.

        When `pins` names the target's ref, that version is the one to install (what an
        earlier stage verified), even if a newer one exists. No side effects: `plan` calls
        this, and it never downloads an image or changes a target.
        """

    def describe(self, target: Target) -> Mapping[str, str]:
        """Facts about a target for logs, `plan` and health-command environment."""

    def plan_snapshot(self, target: Target, run_id: str) -> Snapshot:
        """Name the snapshot this run will take. Pure: it is journaled before `snapshot`."""

    def snapshot(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Snapshot:
        """Take the snapshot; returns it with any data learned while taking it."""

    def apply(self, target: Target, update: Update, snapshot: Snapshot, patch: PatchModel) -> None:
        """Install the update. Raises StepFailed (roll back) or TransientError.

        `snapshot` is always the one `snapshot()` returned, never only the planned one.
        `patch` is the group's patch settings (backends without images use them).
        """

    def verify(self, target: Target, update: Update, health: HealthModel) -> None:
        """Wait until the patched target is healthy by the backend's own signals.

        Raises StepFailed when it is not healthy within `health.timeout`.
        """

    def commit(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Retained | None:
        """Make the patch final.

        Returns what the backend keeps for a while (a snapshot kept for `options.keep`, an
        old image kept for a retention period); patchd records it and calls `release` once
        it expires, across restarts.
        """

    def release(self, retained: Mapping[str, Any]) -> None:
        """Remove something `commit` kept, now expired. Idempotent."""

    def rollback(self, target: Target, snapshot: Snapshot) -> None:
        """Put the target back as the snapshot found it and check it runs again.

        Idempotent; works from a partly taken snapshot. Raises RollbackFailed.
        """

    def close(self) -> None:
        """Release connections."""


class KeptSnapshot(Protocol):
    @property
    def created(self) -> datetime | None: ...


@runtime_checkable
class PreparesRun(Protocol):
    """Optional: a backend that can do a run's shared work at once (one registry query per
    image, pulls started early) before the first target starts."""

    def prepare(self, targets: Sequence[Target], pins: Mapping[str, str]) -> None:
        """Called once per run after discovery; failures are ignored by the engine."""


@runtime_checkable
class ListsSnapshots(Protocol):
    """Optional: a backend whose snapshots can outlive a run (vSphere) lists them, so the
    daemon can export the age of the oldest one."""

    def patchd_snapshots(self) -> Sequence[KeptSnapshot]:
        """Every patchd snapshot the backend can see, oldest first."""
