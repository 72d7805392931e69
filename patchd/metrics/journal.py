"""What the state store says, as gauges: kept items, pending windows, failed rollbacks,
paused groups and quarantined versions.

Read from the store when the daemon re-arms (at start, on reload, after every run and
release), never at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from patchd.config.settings import Group, Settings
from patchd.engine.controls import open_quarantines, pauses
from patchd.engine.packages import Compliance, compliance
from patchd.state import Store
from patchd.states import RunStatus
from patchd.windows import current_opening


@dataclass(frozen=True)
class JournalView:
    """What the state store says, as the gauges of JournalCollector show it."""

    retained_oldest_expiry: dict[str, datetime] = field(default_factory=dict)  # by backend
    retained_items: dict[str, int] = field(default_factory=dict)  # by backend
    pending_windows: dict[str, int] = field(default_factory=dict)  # by group
    last_rollback_failed: dict[str, datetime] = field(default_factory=dict)  # by group
    paused: dict[str, int] = field(default_factory=dict)  # by group: 1 paused, 0 not
    quarantined: dict[str, int] = field(default_factory=dict)  # by group: versions
    # Each target's last compliance check (patchd.compliance), of configured groups.
    compliance: tuple[Compliance, ...] = ()


# Runs that left targets without their update (besides failed or pending targets).
_UNFINISHED_STATUSES = frozenset({RunStatus.FAILED, RunStatus.INTERRUPTED})


def pending_windows(settings: Settings, store: Store, group: Group, limit: int = 200) -> int:
    """In how many windows in a row, up to the last run, the group's runs left updates not
    installed: targets pending, failed or rolled back, or the run failed or was
    interrupted. Several runs in one opening of the window count once; a run outside any
    opening (`patchd run --now`) counts on its own. A run that patched everything ends the
    streak. Windows in which the group did not run at all are not counted."""
    window = settings.windows.get(group.window)
    openings: set[object] = set()
    for run in store.runs(group.name, limit=limit):
        if run.status == RunStatus.RUNNING:
            continue
        left = run.failed > 0 or bool(run.detail.get("pending"))
        if not left and run.status not in _UNFINISHED_STATUSES:
            break
        opening = None
        if window is not None and run.window == group.window:
            opening = current_opening(window, run.started, settings.freezes)
        openings.add(opening.start if opening is not None else run.id)
    return len(openings)


def journal_view(settings: Settings, store: Store, now: datetime | None = None) -> JournalView:
    """Read JournalView's numbers from the store (the daemon does so when it re-arms, and
    when an operator's control changes); pauses in force at `now` (none without it)."""
    oldest: dict[str, datetime] = {}
    items: dict[str, int] = {}
    for row in store.retained():
        items[row.backend] = items.get(row.backend, 0) + 1
        if row.backend not in oldest or row.expires < oldest[row.backend]:
            oldest[row.backend] = row.expires
    failures = store.rollback_failures()
    held = pauses(store, now) if now is not None else {}
    return JournalView(
        retained_oldest_expiry=oldest,
        retained_items=items,
        pending_windows={
            name: pending_windows(settings, store, group) for name, group in settings.groups.items()
        },
        last_rollback_failed={g: at for g, at in failures.items() if g in settings.groups},
        paused={g: int(g in held) for g in settings.groups},
        quarantined={g: len(open_quarantines(store, g)) for g in settings.groups},
        compliance=tuple(c for c in compliance(store) if c.group in settings.groups),
    )


class JournalCollector(Collector):
    """Gauges from the state store, as of the daemon's last refresh (when it re-arms: at
    start, on reload, after every run and release); no store read at scrape time."""

    def __init__(self, view: Callable[[], JournalView]) -> None:
        self.view = view

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self.view()
        families: list[tuple[str, str, str, Mapping[str, float]]] = [
            (
                "patchd_retained_oldest_expiry_timestamp_seconds",
                "When the oldest snapshot or image kept after a commit is due for removal "
                "(absent when none is kept)",
                "backend",
                {b: at.timestamp() for b, at in view.retained_oldest_expiry.items()},
            ),
            (
                "patchd_retained_items",
                "Snapshots and images kept after a commit, waiting for their keep to run out",
                "backend",
                view.retained_items,
            ),
            (
                "patchd_group_pending_windows",
                "Windows in a row, up to the last run, whose runs left updates not installed",
                "group",
                view.pending_windows,
            ),
            (
                "patchd_group_last_rollback_failed_timestamp_seconds",
                "When a target of the group last ended rollback_failed (absent when never)",
                "group",
                {g: at.timestamp() for g, at in view.last_rollback_failed.items()},
            ),
            (
                "patchd_group_paused",
                "1 while an operator's pause holds the group's new starts (patchd pause)",
                "group",
                view.paused,
            ),
            (
                "patchd_quarantined_versions",
                "Versions that failed on a target of the group and are not installed again",
                "group",
                view.quarantined,
            ),
        ]
        for name, documentation, label, values in families:
            family = GaugeMetricFamily(name, documentation, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            yield family
        yield from compliance_families(view.compliance)


def compliance_families(checks: Iterable[Compliance]) -> Iterator[GaugeMetricFamily]:
    """Each target's last compliance check as gauges (a target whose check failed
    keeps no series: its previous numbers are not current)."""
    pending = GaugeMetricFamily(
        "patchd_target_pending_updates",
        "Package updates pending on the target at its last check, by kind (security or"
        " other), whether its baseline lets them in or holds them back",
        labels=["group", "target", "kind"],
    )
    held = GaugeMetricFamily(
        "patchd_target_held_updates",
        "Pending updates the group's baseline holds back (excluded, not included, not"
        " security, approve_after not yet passed)",
        labels=["group", "target"],
    )
    reboot = GaugeMetricFamily(
        "patchd_target_reboot_required",
        "1 when the machine asked for a reboot at its last check (/var/run/reboot-required)",
        labels=["group", "target"],
    )
    since = GaugeMetricFamily(
        "patchd_target_security_pending_since_timestamp_seconds",
        "When patchd first saw the oldest security update still pending on the target"
        " (absent when none is pending)",
        labels=["group", "target"],
    )
    checked = GaugeMetricFamily(
        "patchd_target_last_checked_timestamp_seconds",
        "When the target's pending updates were last checked",
        labels=["group", "target"],
    )
    for c in sorted(checks, key=lambda c: (c.group, c.target)):
        labels = [c.group, c.target]
        counts = c.doc.get("pending") or {}
        for kind in ("security", "other"):
            pending.add_metric([*labels, kind], float(counts.get(kind, 0)))
        held.add_metric(labels, float(c.doc.get("held") or 0))
        reboot.add_metric(labels, 1.0 if c.doc.get("reboot_required") else 0.0)
        oldest = c.doc.get("oldest_security_seen")
        if oldest:
            since.add_metric(labels, datetime.fromisoformat(oldest).timestamp())
        checked.add_metric(labels, c.checked.timestamp())
    yield from (pending, held, reboot, since, checked)
