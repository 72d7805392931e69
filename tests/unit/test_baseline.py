"""Baselines: their config keys, and the pure decision on a pending list (excludes,
includes, security only, approve_after counted from the journaled first sighting, the
reboot policy). No machine, no sleeping: the instants are parameters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd.backends.base import Snapshot, Update
from patchd.backends.ssh import SSHBackend, SSHSelect
from patchd.config import ConfigError, load_settings
from patchd.config.baselines import BaselineModel
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel
from patchd.config.settings import Group
from patchd.config.types import Limit
from patchd.engine.packages import FIRST_SEEN, StoreFirstSeen, held_summary
from patchd.engine.target import NullObserver, TargetContext, peek_update
from patchd.guest import system
from patchd.guest.baseline import (
    EXCLUDED,
    NOT_INCLUDED,
    NOT_SECURITY,
    NOT_YET,
    NoJournal,
    decide,
    reboot_wanted,
    seen_key,
)
from patchd.guest.packages import Pending, identity
from patchd.state import open_store
from tests.conftest import write_config

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SEC = "Debian-Security:12/stable-security"
PENDING = [
    Pending("libssl3", "3.0.11", "3.0.15", True, SEC),
    Pending("linux-image-amd64", "6.1.112", "6.1.119", False, "Debian:12.8/stable"),
    Pending("openssl", "3.0.11", "3.0.15", True, SEC),
    Pending("tzdata", "2024a", "2024b", False, "Debian:12.8/stable-updates"),
]


class Journal:
    """A first-seen journal in memory, as the store keeps it: a key keeps its first instant."""

    def __init__(self) -> None:
        self.seen: dict[str, datetime] = {}

    def first_seen(self, keys: Iterable[str], now: datetime) -> Mapping[str, datetime]:
        for key in keys:
            self.seen.setdefault(key, now)
        return dict(self.seen)


def _held(baseline: BaselineModel, journal: Journal, now: datetime) -> dict[str, tuple[str, str]]:
    decision = decide(baseline, PENDING, journal, now)
    return {h.update.package: (h.kind, h.reason) for h in decision.held}


def test_without_a_baseline_everything_is_eligible() -> None:
    decision = decide(None, PENDING, NoJournal(), T0)
    assert decision.eligible == tuple(PENDING) and decision.held == ()
    assert decision.oldest_security() == T0


def test_exclude_wins_over_include_and_says_which_glob() -> None:
    baseline = BaselineModel(exclude=["linux-image-*"], include=["linux-*", "libssl*", "tz*"])
    held = _held(baseline, Journal(), T0)
    assert held == {
        "linux-image-amd64": (EXCLUDED, "excluded by the baseline (linux-image-*)"),
        "openssl": (NOT_INCLUDED, "not among the baseline's include (linux-*, libssl*, tz*)"),
    }


def test_security_only_holds_back_the_rest_with_its_origin() -> None:
    held = _held(BaselineModel(security_only=True), Journal(), T0)
    assert held == {
        "linux-image-amd64": (NOT_SECURITY, "not a security update (Debian:12.8/stable)"),
        "tzdata": (NOT_SECURITY, "not a security update (Debian:12.8/stable-updates)"),
    }


def test_approve_after_counts_from_the_first_sighting_and_says_until_when() -> None:
    journal = Journal()
    baseline = BaselineModel(approve_after=timedelta(days=7))
    first = decide(baseline, PENDING, journal, T0)
    assert first.eligible == ()
    until = T0 + timedelta(days=7)
    assert {h.kind for h in first.held} == {NOT_YET}
    assert all(h.until == until for h in first.held)
    assert first.held[0].reason == (
        "approve_after 7d: first seen 2026-03-01T12:00:00Z, eligible at 2026-03-08T12:00:00Z"
    )
    # A day before: still held, first seen unchanged (not moved to the later instant).
    later = decide(baseline, PENDING, journal, until - timedelta(days=1))
    assert later.eligible == () and later.held[0].until == until
    # A new candidate of tzdata appears on day 3: its own clock starts then.
    moved = [*PENDING[:3], Pending("tzdata", "2024a", "2025a", False, "Debian:12.9/stable")]
    decide(baseline, moved, journal, T0 + timedelta(days=3))
    at_until = decide(baseline, moved, journal, until)
    assert [p.package for p in at_until.eligible] == ["libssl3", "linux-image-amd64", "openssl"]
    assert at_until.held[0].until == T0 + timedelta(days=10)
    assert journal.seen[seen_key("tzdata", "2024b")] == T0


def test_a_version_held_for_another_reason_is_still_journaled() -> None:
    # Lifting an exclude later must not restart approve_after from that day.
    journal = Journal()
    decide(BaselineModel(exclude=["*"], approve_after=timedelta(days=2)), PENDING, journal, T0)
    assert set(journal.seen) == {seen_key(p.package, p.candidate) for p in PENDING}
    lifted = decide(
        BaselineModel(approve_after=timedelta(days=2)), PENDING, journal, T0 + timedelta(days=2)
    )
    assert lifted.held == ()


def test_oldest_security_update_counts_held_ones_too() -> None:
    journal = Journal()
    journal.seen[seen_key("openssl", "3.0.15")] = T0 - timedelta(days=20)
    decision = decide(BaselineModel(exclude=["openssl"]), PENDING, journal, T0)
    assert decision.oldest_security() == T0 - timedelta(days=20)
    assert decide(None, PENDING[1::2], journal, T0).oldest_security() is None


@pytest.mark.parametrize(
    ("policy", "required", "forced", "wanted"),
    [
        ("if-required", None, False, None),
        ("if-required", "/var/run/reboot-required", False, "/var/run/reboot-required"),
        ("if-required", None, True, "patch.reboot = true"),
        ("always", None, False, 'the baseline\'s reboot = "always"'),
        ("never", "/var/run/reboot-required", True, None),
    ],
)
def test_reboot_policy(policy: str, required: str | None, forced: bool, wanted: str | None) -> None:
    assert reboot_wanted(BaselineModel(reboot=policy), required, forced) == wanted


def _config(tmp_path: Path, group: dict[str, object], baselines: dict[str, object]) -> Path:
    key = tmp_path / "id"
    key.write_text("key")
    key.chmod(0o600)
    return write_config(
        tmp_path / "patchd.toml",
        {
            "windows": {"w": {"days": ["sat"], "duration": "4h"}},
            "backends": {
                "machines": {"type": "ssh", "ssh": {"identity_file": key}},
                "containers": {"type": "docker"},
            },
            "baselines": baselines,
            "groups": {"g": {"backend": "machines", "window": "w", **group}},
        },
    )


def test_a_group_gets_the_baseline_it_names(tmp_path: Path) -> None:
    settings = load_settings(
        _config(
            tmp_path,
            {"baseline": "careful"},
            {"careful": {"security_only": True, "approve_after": "3d", "reboot": "never"}},
        )
    )
    group = settings.groups["g"]
    assert group.baseline_name == "careful"
    assert group.baseline == BaselineModel(
        security_only=True, approve_after=timedelta(days=3), reboot="never"
    )
    assert settings.baselines["careful"] is group.baseline


def test_baseline_errors_name_the_key_path(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        {"baseline": "carefull"},
        {"careful": {"reboot": "sometimes", "exclude": ["bad glob"], "approve_after": "a week"}},
    )
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    text = str(err.value)
    assert "baselines.careful.reboot: " in text and "'if-required'" in text
    assert "baselines.careful.exclude.0: " in text
    assert "baselines.careful.approve_after: invalid duration 'a week'" in text
    assert "groups.g.baseline: unknown baseline 'carefull'; did you mean 'careful'?" in text


class _Machine:
    """What the ssh backend asks of a machine's package manager, answered from a list."""

    def __init__(self, pending: list[Pending], reboot: str | None = None) -> None:
        self.pending_now = pending
        self.reboot = reboot

    def __enter__(self) -> _Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def refresh(self) -> None:
        return None

    def pending(self) -> list[Pending]:
        return self.pending_now

    def reboot_required(self) -> str | None:
        return self.reboot


def _backend(tmp_path: Path, machine: _Machine) -> SSHBackend:
    key = tmp_path / "id"
    key.write_text("key")
    key.chmod(0o600)
    backend = SSHBackend(
        "m", {"ssh": {"identity_file": str(key)}, "hosts": [{"name": "web1", "address": "a"}]}
    )
    # The backend's own steps (snapshot, rollback) and its shared package patcher's.
    backend._connect = lambda target: machine  # type: ignore[method-assign]
    backend.packages.connect = lambda target: machine  # type: ignore[assignment,return-value]
    backend.packages.driver = lambda session: machine  # type: ignore[method-assign]
    return backend


def _group(baseline: BaselineModel, name: str) -> Group:
    """A group of the ssh backend `m` under `baseline` (named `name`)."""
    return Group(
        "g", "m", "w", SSHSelect(), None, timedelta(0), Limit(1), Limit(1),
        SnapshotModel(), HealthModel(), baseline=baseline, baseline_name=name,
    )  # fmt: skip


def test_the_ssh_backend_installs_what_the_baseline_lets_in(tmp_path: Path) -> None:
    machine = _Machine(PENDING, reboot="/var/run/reboot-required")
    backend = _backend(tmp_path, machine)
    [target] = backend.discover(SSHSelect())
    baseline = BaselineModel(exclude=["linux-image-*"], security_only=True)
    found = backend.assess(target, {}, PatchModel(), baseline, Journal(), T0)
    assert found.versions == {"libssl3": "3.0.15", "openssl": "3.0.15"}
    assert found.update is not None and found.update.available == identity(found.versions)
    assert found.reboot_required == "/var/run/reboot-required"
    assert found.summary() == {"security": 2, "other": 2, "held": 2}
    # Everything held back: no update, and the engine's reason names the baseline.
    held = backend.assess(target, {}, PatchModel(), BaselineModel(include=["x*"]), Journal(), T0)
    assert held.update is None and held.versions == {}
    assert held_summary(held, _group(baseline, "careful")).startswith(
        "baseline 'careful' holds back 4 update(s): libssl3 3.0.15: not among the"
        " baseline's include (x*); linux-image-amd64 6.1.119: not among"
    )


def test_a_target_left_for_later_shows_what_its_baseline_lets_in(tmp_path: Path) -> None:
    """peek_update (patchd_target_update_available of a pending or skipped target) asks
    as a run would: a machine whose baseline holds back everything has no update."""
    backend = _backend(tmp_path, _Machine(PENDING))
    [target] = backend.discover(SSHSelect())
    store = open_store(tmp_path / "state.db")

    def peek(baseline: BaselineModel) -> Update | None:
        group = _group(baseline, "b")
        ctx = TargetContext("r1", group, backend, store, lambda: T0, NullObserver(), {})
        return peek_update(ctx, target)

    assert peek(BaselineModel(include=["x*"])) is None
    some = peek(BaselineModel(security_only=True))
    assert some is not None and some.available == identity(
        {"libssl3": "3.0.15", "openssl": "3.0.15"}
    )
    assert list(store.controls(FIRST_SEEN, "")) == []  # a peek journals no sighting


def test_an_excluded_package_is_not_installed_even_when_staging_verified_it(
    tmp_path: Path,
) -> None:
    machine = _Machine(PENDING)
    backend = _backend(tmp_path, machine)
    [target] = backend.discover(SSHSelect())
    staging = backend.assess(target, {}, PatchModel(), None, NoJournal(), T0)
    assert staging.update is not None and len(staging.versions) == 4
    # The repository moves on: production gets staging's versions, less the excluded one.
    machine.pending_now = [*PENDING[:3], Pending("tzdata", "2024a", "2025a", False, "D")]
    pins = {backend.ref: staging.update.available}
    baseline = BaselineModel(exclude=["linux-image-*"])
    prod = backend.assess(target, pins, PatchModel(), baseline, Journal(), T0)
    assert prod.versions == {"libssl3": "3.0.15", "openssl": "3.0.15", "tzdata": "2024b"}
    assert prod.update is not None and prod.update.available == staging.update.available


def test_first_sightings_are_journaled_in_the_store(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state.db")
    journal = StoreFirstSeen(store)
    assert journal.first_seen(["a=1"], T0) == {"a=1": T0}
    later = T0 + timedelta(days=1)
    assert journal.first_seen(["a=1", "b=2"], later) == {"a=1": T0, "b=2": later}
    store.close()
    reopened = open_store(tmp_path / "state.db", readonly=True)  # as after a restart
    look = StoreFirstSeen(reopened, record=False)
    assert look.first_seen(["a=1", "c=3"], later) == {"a=1": T0, "c=3": later}
    assert "c=3" not in {row.key for row in reopened.controls(FIRST_SEEN, "")}


@pytest.mark.parametrize(("policy", "reboots"), [("never", 0), ("if-required", 1)])
def test_apply_reboots_as_the_baseline_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, reboots: int
) -> None:
    machine = _Machine([PENDING[0]], reboot="/var/run/reboot-required")
    installed: list[Mapping[str, str]] = []
    machine.install = installed.append  # type: ignore[attr-defined]
    backend = _backend(tmp_path, machine)
    rebooted: list[object] = []
    monkeypatch.setattr(system, "reboot", lambda *args: rebooted.append(args))
    [target] = backend.discover(SSHSelect())
    baseline = BaselineModel(reboot=policy)
    found = backend.assess(target, {}, PatchModel(), baseline, NoJournal(), T0)
    assert found.update is not None
    snapshot = Snapshot(target.id, {"recorded": {"libssl3": "3.0.11"}})
    backend.apply(target, found.update, snapshot, PatchModel())
    assert installed == [{"libssl3": "3.0.15"}]
    assert len(rebooted) == reboots
