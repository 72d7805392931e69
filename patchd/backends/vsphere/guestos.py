"""The VM flow's `patch.method = "apt"` or `"dnf"`: the VM's own operating system is
patched by patchd over SSH, between the vSphere snapshot and its commit or revert.

The package steps are patchd.guest.patcher's, shared with the plain `ssh` backend (the same
exact package sets, ledger and stage pins: production installs what staging verified).
What is the VM's own: how it is reached. The SSH address is read from vCenter at each
connection (the guest IP VMware Tools report, or the backend's `guest.address` template
filled with the VM's name or guest host name), so a VM that comes back from a reboot with
another address is still found. A VM with no address yet is "unreachable" (a transient
state: Tools may not have reported it since the boot).

- check / assess: the pre-check of the VM flow, then the pending set over SSH with the
  group's method's driver (`Update.ref` "packages:apt" or "packages:dnf"; the ref picks
  the driver for the later steps), under the group's baseline (`[baselines.NAME]`: the
  same held-back reasons, approve_after journal and staged pins as for an ssh machine).
- snapshot: after the vSphere snapshot, the installed versions of that set are recorded
  in the snapshot's data (what the journal shows the VM was on).
- apply: install exactly the set; reboot (`systemctl reboot` over SSH) as the baseline's
  `reboot` says (by default when the guest asks for it or `patch.reboot` is set), and
  wait for SSH with a new boot id.
- verify: `systemctl is-system-running` says running and the versions are the set's;
  the VM flow then also wants VMware Tools healthy, as for "command".
- rollback is the VM flow's: revert to the snapshot (the disk as it was, not a downgrade).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from patchd.backends.base import Target, Update
from patchd.config.baselines import PACKAGE_METHODS
from patchd.guest.patcher import PackagePatcher
from patchd.guest.settings import GuestModel

if TYPE_CHECKING:
    from patchd.backends.vsphere.flow import State
    from patchd.config.baselines import BaselineModel
    from patchd.guest.assessment import Assessment
    from patchd.guest.baseline import FirstSeen
    from patchd.guest.ssh import Session

PACKAGES = "packages:"  # the prefix of an Update.ref this module made
METHODS = PACKAGE_METHODS  # the patch.method values this module patches with


class GuestOs:
    """Package patching of the VMs of one vSphere backend (its `guest` table)."""

    def __init__(self, backend: str, guest: GuestModel, read: Callable[[str], State]) -> None:
        self.backend = backend
        self.guest = guest
        self.read = read
        # One per package manager: the method is a group's, the guest table the backend's.
        self.patchers = {
            manager: PackagePatcher(
                self.connect,
                ledger=guest.ledger,
                lock_timeout=guest.lock_timeout.total_seconds(),
                reboot_timeout=guest.reboot_timeout.total_seconds(),
                package_manager=manager,
            )
            for manager in METHODS
        }

    def address(self, state: State) -> str:
        from patchd.guest.errors import Unreachable

        address = self.guest.resolve(state.name, state.hostname, state.ip)
        if not address:
            what = "guest IP" if self.guest.address is None else "guest host name"
            raise Unreachable(
                f"{state.name}: VMware Tools report no {what} (yet); patchd reaches the"
                " VM over SSH at it"
                f" (backends.{self.backend}.guest.address sets another)"
            )
        return address

    def connect(self, target: Target) -> Session:
        from patchd.guest.ssh import Session

        return Session(target.name, self.address(self.read(target.id)), self.guest.ssh)

    def check(self, target: Target, pins: Mapping[str, str], method: str) -> Update | None:
        return self.patchers[method].check(target, pins)

    def assess(
        self,
        target: Target,
        pins: Mapping[str, str],
        method: str,
        baseline: BaselineModel | None,
        journal: FirstSeen,
        now: datetime,
    ) -> Assessment:
        """What is pending and what the group's baseline lets in, as for an ssh machine."""
        return self.patchers[method].assess(target, pins, baseline, journal, now)

    def checked(self, target: Target) -> bool:
        """Whether a check of this process found a set for the target (apt or dnf in use)."""
        return any(p.pending_for(target) for p in self.patchers.values())

    def record(self, target: Target) -> dict[str, str | None]:
        patcher = next(p for p in self.patchers.values() if p.pending_for(target))
        with self.connect(target) as session:
            return patcher.record(target, session)

    def _by_ref(self, update: Update) -> PackagePatcher:
        return self.patchers[update.ref.removeprefix(PACKAGES)]

    def install(
        self, target: Target, update: Update, snapshot: Mapping[str, Any], reboot: bool
    ) -> None:
        self._by_ref(update).install(target, update, snapshot.get("recorded") or {}, reboot)

    def verify(self, target: Target, update: Update, timeout: float) -> None:
        self._by_ref(update).verify(target, update, timeout)

    def forget(self, target: Target) -> None:
        for patcher in self.patchers.values():
            patcher.forget(target)
