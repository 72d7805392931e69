"""SSH backend (`type = "ssh"`): patches the operating system of plain Linux machines with
their own package manager, over SSH, with no agent and no snapshot.

A target is a machine of the backend's inventory (`hosts`, or an `inventory` TOML file of
`[[hosts]]`), identified by its name. One patch:

- check_update / assess: refresh the package lists, simulate the full upgrade and take the
  pending set of exact versions that the group's baseline lets in (patchd.guest.baseline;
  `assess` also returns what it holds back and why, for plan and compliance).
  `Update.ref` is "packages:<driver>"; `available` is the identity of that set
  (patchd.guest.packages.identity), `current` the identity of the installed versions of
  the same packages. A pin on the ref (what staging verified) limits the install to that
  set's versions, less what this group's baseline holds back: packages staging never
  verified are left alone, and a repository that has moved on since does not matter.
  Every set seen is kept in a ledger
  (in memory, and in the `ledger` file when set, so pins resolve after a restart).
- snapshot: record the installed version of every package the set changes (and run the
  site's `snapshot_command`, e.g. an LVM snapshot, when set). Nothing is copied.
- apply: install exactly the set (refused, nothing changed, when apt or dnf would pull in
  a package outside it); reboot as the baseline's `reboot` says (by default when the
  machine asks: /var/run/reboot-required with apt, `dnf needs-restarting -r` with dnf;
  or `patch.reboot` is set), and wait until SSH answers with a new boot id.
- verify: the installed versions are the set's, and `systemctl is-system-running` says
  running (degraded fails with the failed units named).
- rollback: DOWNGRADE exactly the packages whose installed version differs from the
  recorded one (removing those that were new), check the versions and the system state.
  It is logged as a downgrade: package scripts ran forward and back, which is not a
  restore of the disk.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, FilePath, ValidationError, model_validator

from patchd.backends.base import (
    BackendError,
    Retained,
    RollbackFailed,
    Snapshot,
    StepFailed,
    Target,
    TransientError,
    Update,
)
from patchd.config.baselines import BaselineModel
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel
from patchd.config.types import STRICT, Duration
from patchd.guest.patcher import SETTLE, PackagePatcher
from patchd.guest.settings import SshModel

if TYPE_CHECKING:
    from patchd.guest.assessment import Assessment
    from patchd.guest.baseline import FirstSeen

KIND = "machine"


class Host(BaseModel):
    """One machine of the inventory."""

    model_config = STRICT

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")]
    address: Annotated[str, Field(min_length=1)]
    labels: dict[str, str] = Field(default_factory=dict)


class Inventory(BaseModel):
    model_config = STRICT

    hosts: list[Host] = Field(default_factory=list)


class SSHConfig(BaseModel):
    """`[backends.NAME]` keys for `type = "ssh"`."""

    model_config = STRICT

    hosts: list[Host] = Field(default_factory=list)
    # A TOML file of [[hosts]] tables (name, address, labels), read at each discover.
    inventory: FilePath | None = None
    ssh: SshModel
    package_manager: Literal["apt", "dnf"] = "apt"
    # How long an install waits for another apt, dpkg or dnf to release the lock.
    lock_timeout: Duration = timedelta(minutes=5)
    # Longest wait for a machine to go down and come back with a new boot id.
    reboot_timeout: Duration = timedelta(minutes=15)
    # After a downgrade: longest wait for the machine to be running again.
    rollback_timeout: Duration = timedelta(minutes=10)
    # A site hook run ON the machine (with sudo when ssh.sudo) before the install, e.g. an
    # LVM or btrfs snapshot; "{snapshot}" in an argument becomes the snapshot's name.
    snapshot_command: Annotated[list[str], Field(min_length=1)] | None = None
    # Where the package sets seen by check_update are kept, so that staged promotion's
    # pins resolve after a restart (a JSON file; in memory only when unset).
    ledger: Path | None = None

    @model_validator(mode="after")
    def _unique(self) -> SSHConfig:
        names = [h.name for h in self.hosts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"hosts: duplicate names {', '.join(dup)}")
        return self


class SSHSelect(BaseModel):
    """A group's `select` for ssh: any name glob (all hosts when none), every label."""

    model_config = STRICT

    names: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)


class SSHBackend:
    """The ssh backend plugin: one `[backends.NAME]` table, an inventory of machines."""

    config_model: ClassVar[type[BaseModel]] = SSHConfig
    select_model: ClassVar[type[BaseModel]] = SSHSelect

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config: SSHConfig = (
            config if isinstance(config, SSHConfig) else SSHConfig.model_validate(config)
        )
        self.packages = PackagePatcher(
            self._connect,
            ledger=self.config.ledger,
            lock_timeout=self.config.lock_timeout.total_seconds(),
            reboot_timeout=self.config.reboot_timeout.total_seconds(),
            package_manager=self.config.package_manager,
        )
        self.ref = self.packages.ref
        self.ledger = self.packages.ledger

    @classmethod
    def check_group(
        cls, backend: str, config: SSHConfig, select: SSHSelect, patch: PatchModel
    ) -> list[tuple[tuple[str, ...], str]]:
        """The ssh backend patches with its package manager only (see patchd.plugins)."""
        if "method" in patch.model_fields_set and patch.method != config.package_manager:
            return [
                (
                    ("patch", "method"),
                    f"backend {backend!r} (type ssh) patches with its package_manager"
                    f" {config.package_manager!r}; set method = {config.package_manager!r}"
                    " or leave it out",
                )
            ]
        return []

    # --- machines and sessions -----------------------------------------------------------
    def hosts(self) -> list[Host]:
        hosts = list(self.config.hosts)
        path = self.config.inventory
        if path is not None:
            try:
                hosts += Inventory.model_validate(tomllib.loads(path.read_text())).hosts
            except (OSError, ValueError, ValidationError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise BackendError(f"inventory {path}: {reason}") from None
        return hosts

    def _host(self, target: Target) -> Host:
        for host in self.hosts():
            if host.name == target.id:
                return host
        raise StepFailed(f"{target.name}: no longer in the inventory of backend {self.name!r}")

    def _connect(self, target: Target) -> Any:
        from patchd.guest.ssh import Session

        return Session(target.name, self._host(target).address, self.config.ssh)

    def _driver(self, session: Any) -> Any:
        return self.packages.driver(session)

    def ping(self) -> None:
        # Machines are many and any may be down; what must work for all is the key.
        from patchd.guest.ssh import Session

        try:
            Session(self.name, "", self.config.ssh).check_key()
        except StepFailed as err:
            raise TransientError(str(err)) from None

    def close(self) -> None:
        self.packages.forget_all()

    def discover(self, select: BaseModel) -> Sequence[Target]:
        assert isinstance(select, SSHSelect)
        found = []
        for host in self.hosts():
            if select.names and not any(fnmatch.fnmatchcase(host.name, p) for p in select.names):
                continue
            if any(host.labels.get(k) != v for k, v in select.labels.items()):
                continue
            found.append(Target(id=host.name, name=host.name, kind=KIND, labels=host.labels))
        return sorted(found, key=lambda t: t.name)

    def describe(self, target: Target) -> Mapping[str, str]:
        host = self._host(target)
        return {
            "name": target.name,
            "address": host.address,
            "ip": host.address,
            "user": self.config.ssh.user,
            "package_manager": self.config.package_manager,
        }

    # --- what is pending -----------------------------------------------------------------
    def check_update(
        self, target: Target, pins: Mapping[str, str], patch: PatchModel
    ) -> Update | None:
        return self.packages.check(target, pins)

    def assess(
        self,
        target: Target,
        pins: Mapping[str, str],
        patch: PatchModel,
        baseline: BaselineModel | None,
        journal: FirstSeen,
        now: datetime,
    ) -> Assessment:
        """What is pending and what the group's baseline lets in (PackagePatcher.assess)."""
        return self.packages.assess(target, pins, baseline, journal, now)

    # --- the patch ---------------------------------------------------------------------
    def plan_snapshot(self, target: Target, run_id: str) -> Snapshot:
        return Snapshot(target.id, {"machine": target.id, "name": f"patchd-{run_id}"})

    def snapshot(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Snapshot:
        """Record the installed versions of what the latest check found pending."""
        with self._connect(target) as session:
            recorded = self.packages.record(target, session)
            if self.config.snapshot_command:
                argv = [
                    a.replace("{snapshot}", snapshot.data["name"])
                    for a in self.config.snapshot_command
                ]
                session.run(argv, sudo=True)
        return Snapshot(target.id, {**snapshot.data, "recorded": recorded})

    def apply(self, target: Target, update: Update, snapshot: Snapshot, patch: PatchModel) -> None:
        recorded = snapshot.data.get("recorded") or {}
        self.packages.install(target, update, recorded, patch.reboot)

    def verify(self, target: Target, update: Update, health: HealthModel) -> None:
        self.packages.verify(target, update, health.timeout.total_seconds())

    def commit(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Retained | None:
        self.packages.forget(target)
        return None  # nothing is kept: there is no snapshot to remove later

    def release(self, retained: Mapping[str, Any]) -> None:
        return None

    def rollback(self, target: Target, snapshot: Snapshot) -> None:
        """Downgrade exactly the packages whose version differs from the recorded one."""
        from patchd import log
        from patchd.guest import system
        from patchd.guest.errors import Unreachable
        from patchd.guest.packages import describe

        recorded: dict[str, str | None] = dict(snapshot.data.get("recorded") or {})
        try:
            with self._connect(target) as session:
                driver = self._driver(session)
                now = driver.installed(recorded)
                changed = {p: v for p, v in recorded.items() if now.get(p) != v}
                if changed:
                    log.get().warning(
                        "rolling back by downgrading packages (no disk snapshot)",
                        target=target.name,
                        downgrade=describe(changed),
                        were=describe({p: now.get(p) for p in changed}),
                    )
                    driver.downgrade(changed)
                    still = {p: v for p, v in driver.installed(changed).items() if v != changed[p]}
                    if still:
                        raise RollbackFailed(
                            f"{target.name}: after the downgrade, still on {describe(still)}"
                        )
                    if driver.reboot_required():
                        system.reboot(
                            lambda: self._connect(target),
                            session,
                            self.config.reboot_timeout.total_seconds(),
                        )
            system.wait_running(
                lambda: self._connect(target),
                self.config.rollback_timeout.total_seconds(),
                SETTLE,
            )
        except (Unreachable, RollbackFailed):
            raise
        except BackendError as err:
            raise RollbackFailed(f"downgrade: {err}") from None
