"""What a package-patching backend found on one target under a baseline: everything
pending, the baseline's decision, whether the machine asks for a reboot, and the update
(if any) a run would install. The optional backend protocol that provides it
(`AssessesPackages`) is what `patchd compliance`, `plan` and the engine ask for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from patchd.backends.base import Target, Update
from patchd.config.baselines import BaselineModel
from patchd.config.schema import PatchModel
from patchd.guest.baseline import Decision, FirstSeen
from patchd.guest.packages import Pending


@dataclass(frozen=True)
class Assessment:
    pending: tuple[Pending, ...]  # everything the package manager would install now
    decision: Decision  # of the group's baseline (all eligible without one)
    reboot_required: str | None  # the machine's own reason, or None
    update: Update | None  # what a run installs; None: nothing (current or all held)
    # The exact versions a run installs (staging's pin, less what the baseline holds).
    versions: Mapping[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        """Counts: pending security and other updates (all of them, whether the
        baseline lets them in or not), and how many of those it holds back."""
        return {
            "security": sum(1 for p in self.pending if p.security),
            "other": sum(1 for p in self.pending if not p.security),
            "held": len(self.decision.held),
        }


@runtime_checkable
class AssessesPackages(Protocol):
    """A backend that patches packages: it can say what is pending per package. A
    backend whose targets are not all patched that way (vSphere: VMs with patch.method
    "apt" or "dnf" are, ESXi hosts and "command" groups are not) answers None for the others."""

    def assess(
        self,
        target: Target,
        pins: Mapping[str, str],
        patch: PatchModel,
        baseline: BaselineModel | None,
        journal: FirstSeen,
        now: datetime,
    ) -> Assessment | None:
        """Refresh the package lists and assess the target; changes nothing on it.
        None: this target, patched as `patch` says, does not install packages."""
