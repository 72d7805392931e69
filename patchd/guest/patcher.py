"""Patching one machine's packages to an exact set: the steps every backend that patches an
operating system over SSH shares (the plain `ssh` backend with apt or dnf, and the vSphere
VM flow with `patch.method = "apt"` or `"dnf"`).

- `assess` / `check`: refresh, simulate the full upgrade, take the pending set of exact
  versions that the group's baseline lets in (patchd.guest.baseline; `assess` also says
  what it holds back and why, for plan and compliance; `check` is `assess` with no
  baseline). `Update.ref` is "packages:<driver>"; `available` is the set's identity
  (patchd.guest.packages.identity), `current` the identity of the installed versions of
  the same packages. A pin on the ref (what staging verified) limits the install to that
  set's versions, less what this group's baseline holds back: packages staging never
  verified are left alone, and a repository that has moved on since does not matter.
  Every set seen is kept in the `Ledger` (in memory, and in a file when configured, so
  pins resolve after a restart).
- `record`: the installed version of every package the set changes (what a downgrade
  goes back to, and what the snapshot's journal row shows).
- `install`: exactly the set (refused, nothing changed, when apt would pull in a package
  outside it); then a reboot as the baseline's `reboot` says (by default when the machine
  asks for it, /var/run/reboot-required, or the group says so), waited for until SSH
  answers with a new boot id.
- `verify`: `systemctl is-system-running` says running (degraded names the failed units)
  and the installed versions are the set's.

What differs between the backends (how a machine is reached, what a rollback is) stays
with them: they hand in `connect(target) -> Session`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from patchd.backends.base import StepFailed, Target, Update
from patchd.config.baselines import BaselineModel

if TYPE_CHECKING:
    from patchd.guest.assessment import Assessment
    from patchd.guest.baseline import FirstSeen
    from patchd.guest.ssh import Session

SETTLE = 5.0  # seconds a degraded state must last before verify calls it final
# The instant `check` decides at: with no baseline nothing depends on it.
_NO_INSTANT = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Plan:
    """What a check found for one target: the exact versions to install."""

    versions: Mapping[str, str]
    installed: Mapping[str, str | None]
    security: frozenset[str]
    baseline: BaselineModel | None = None  # the group's, for its reboot policy

    @property
    def available(self) -> str:
        from patchd.guest.packages import identity

        return identity(self.versions)


class Ledger:
    """Package sets by identity, shared by every backend of the process (a staging and a
    production backend may be two tables, or two backend types), optionally kept in a file."""

    _lock = threading.Lock()
    _sets: ClassVar[dict[str, dict[str, str]]] = {}

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def _load(self) -> None:
        if self.path is not None and self.path.exists():
            try:
                stored = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise StepFailed(f"cannot read the package-set ledger {self.path}: {err}") from None
            for key, versions in stored.items():
                self._sets.setdefault(key, dict(versions))

    def add(self, key: str, versions: Mapping[str, str]) -> None:
        with self._lock:
            if self._sets.get(key) == dict(versions):
                return
            self._sets[key] = dict(versions)
            if self.path is not None:
                self._load()
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text(json.dumps(self._sets, sort_keys=True), encoding="utf-8")
                tmp.replace(self.path)

    def get(self, key: str) -> dict[str, str] | None:
        with self._lock:
            if key not in self._sets:
                self._load()
            found = self._sets.get(key)
            return dict(found) if found is not None else None


class PackagePatcher:
    """The package steps on machines reached by `connect(target)` (an unopened Session)."""

    def __init__(
        self,
        connect: Callable[[Target], Session],
        *,
        ledger: Path | None,
        lock_timeout: float,
        reboot_timeout: float,
        package_manager: str = "apt",
    ) -> None:
        self.connect = connect
        self.ledger = Ledger(ledger)
        self.package_manager = package_manager
        self.ref = f"packages:{package_manager}"
        self.lock_timeout = lock_timeout
        self.reboot_timeout = reboot_timeout
        self._plans: dict[tuple[str, str], Plan] = {}
        self._lock = threading.Lock()

    def driver(self, session: Session) -> Any:
        if self.package_manager == "dnf":
            from patchd.guest.dnf import DnfDriver

            return DnfDriver(session, self.lock_timeout)
        from patchd.guest.apt import AptDriver

        return AptDriver(session, self.lock_timeout)

    # --- what is pending -----------------------------------------------------------------
    def check(self, target: Target, pins: Mapping[str, str]) -> Update | None:
        """The set a run installs, with no baseline (every pending update eligible)."""
        from patchd.guest.baseline import NoJournal

        # No baseline: every pending update is eligible, so the instant is never read.
        return self.assess(target, pins, None, NoJournal(), _NO_INSTANT).update

    def assess(
        self,
        target: Target,
        pins: Mapping[str, str],
        baseline: BaselineModel | None,
        journal: FirstSeen,
        now: datetime,
    ) -> Assessment:
        """Refresh, list what is pending and what the baseline lets in (patchd.guest.
        assessment). The baseline applies to staging's pinned set too: an excluded
        package is never installed, even when an earlier stage verified it."""
        from patchd.guest.assessment import Assessment
        from patchd.guest.baseline import decide
        from patchd.guest.packages import Pending, identity

        with self.connect(target) as session:
            driver = self.driver(session)
            driver.refresh()
            pending = driver.pending()
            reboot = driver.reboot_required()
        decision = decide(baseline, pending, journal, now)
        installed = {p.package: p.installed for p in pending}
        pin = pins.get(self.ref)
        verified = self.ledger.get(pin) if pin is not None else None
        if verified is not None:
            # Staging's versions of what is still pending here, judged by this baseline.
            now_pending = {p.package: p for p in pending}
            offered = [
                Pending(name, p.installed, version, p.security, p.source)
                for name, version in sorted(verified.items())
                if (p := now_pending.get(name)) is not None and p.installed != version
            ]
            chosen = decide(baseline, offered, journal, now).eligible
        else:
            chosen = decision.eligible
        versions = {p.package: p.candidate for p in chosen}

        def result(update: Update | None) -> Assessment:
            return Assessment(tuple(pending), decision, reboot, update, versions)

        if not versions or (pin is not None and pin == identity(installed)):
            return result(None)
        before = {name: installed[name] for name in versions}
        security = frozenset(p.package for p in chosen if p.security)
        plan = Plan(versions, before, security, baseline)
        if pin is not None and verified is not None:
            available = pin  # a subset of the verified set, named by it
        else:
            # An unknown pin gives the set's own identity: the engine then refuses it as
            # "not verified by the stage" (fail closed).
            available = plan.available
            self.ledger.add(available, versions)
        with self._lock:
            self._plans[(target.id, available)] = plan
        return result(Update(ref=self.ref, current=identity(before), available=available))

    def plan(self, target: Target, available: str) -> Plan:
        with self._lock:
            plan = self._plans.get((target.id, available))
        if plan is None:
            raise StepFailed(
                f"{target.name}: no pending package set {available} was checked for it"
                " in this process (check_update first)"
            )
        return plan

    def pending_for(self, target: Target) -> bool:
        """Whether a check of this process found a set for the target."""
        with self._lock:
            return any(tid == target.id for tid, _ in self._plans)

    def forget_all(self) -> None:
        with self._lock:
            self._plans.clear()

    def forget(self, target: Target) -> None:
        with self._lock:
            for key in [k for k in self._plans if k[0] == target.id]:
                del self._plans[key]

    # --- the patch -----------------------------------------------------------------------
    def record(self, target: Target, session: Session) -> dict[str, str | None]:
        """The installed versions of what the latest check found pending (or, with no
        check in this process, of what is pending now)."""
        with self._lock:
            plans = [p for (tid, _), p in self._plans.items() if tid == target.id]
        packages = sorted({name for plan in plans for name in plan.versions})
        if not packages:
            packages = [p.package for p in self.driver(session).pending()]
        recorded: dict[str, str | None] = self.driver(session).installed(packages)
        return recorded

    def install(
        self, target: Target, update: Update, recorded: Mapping[str, Any], reboot: bool
    ) -> None:
        """Install exactly the checked set; reboot as its baseline says (by default when
        the machine asks, or `reboot`)."""
        from patchd import log
        from patchd.guest import system
        from patchd.guest.baseline import reboot_wanted

        plan = self.plan(target, update.available)
        unrecorded = sorted(set(plan.versions) - set(recorded))
        if unrecorded:
            raise StepFailed(
                f"{target.name}: the snapshot did not record {', '.join(unrecorded)};"
                " not installing what could not be rolled back"
            )
        with self.connect(target) as session:
            driver = self.driver(session)
            driver.install(plan.versions)
            reason = reboot_wanted(plan.baseline, driver.reboot_required(), reboot)
            if reason is None:
                return
            log.get().info("rebooting after the install", target=target.name, reason=reason)
            system.reboot(lambda: self.connect(target), session, self.reboot_timeout)

    def verify(self, target: Target, update: Update, timeout: float) -> None:
        """systemd says running, and the installed versions are the set's."""
        from patchd.guest import system
        from patchd.guest.packages import describe

        system.wait_running(lambda: self.connect(target), timeout, min(SETTLE, timeout))
        with self._lock:
            plan = self._plans.get((target.id, update.available))
        if plan is None:
            return
        with self.connect(target) as session:
            now = self.driver(session).installed(plan.versions)
        wrong = {p: v for p, v in now.items() if v != plan.versions[p]}
        if wrong:
            raise StepFailed(
                f"{target.name}: installed versions differ from the update: {describe(wrong)}"
            )
