"""Gauges computed at scrape time from what the daemon already holds: windows (asked of
patchd.windows, like every other answer to "when"), snapshot ages and group settings;
and the list of collectors the daemon registers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from patchd.config.baselines import BaselineModel, installs_packages
from patchd.config.settings import Settings
from patchd.metrics.journal import JournalCollector, JournalView
from patchd.windows import window_now


class WindowCollector(Collector):
    """Window gauges computed at scrape time, so they are right without any polling."""

    def __init__(self, settings: Callable[[], Settings], clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        settings = self.settings()
        now = self.clock()
        is_open = GaugeMetricFamily(
            "patchd_window_open",
            "1 while the window allows a target to start (open, unfrozen, before its cutoff)",
            labels=["window"],
        )
        next_open = GaugeMetricFamily(
            "patchd_window_next_open_timestamp_seconds",
            "When the window next starts allowing starts",
            labels=["window"],
        )
        for name, window in settings.windows.items():
            answer = window_now(window, now, settings.freezes)
            is_open.add_metric([name], 1 if answer.may_start else 0)
            if answer.next_start is not None:
                next_open.add_metric([name], answer.next_start.timestamp())
        yield is_open
        yield next_open


class SnapshotAgeCollector(Collector):
    """Age of each backend's oldest patchd snapshot, from creation times the daemon refreshes
    after every run and release (no backend call at scrape time)."""

    def __init__(
        self, oldest: Callable[[], dict[str, datetime | None]], clock: Callable[[], datetime]
    ) -> None:
        self.oldest = oldest
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "patchd_snapshot_oldest_age_seconds",
            "Age of the oldest patchd snapshot on the backend (0 when there is none)",
            labels=["backend"],
        )
        now = self.clock()
        for backend, created in sorted(self.oldest().items()):
            family.add_metric([backend], (now - created).total_seconds() if created else 0.0)
        yield family


class GroupCollector(Collector):
    """Per-group settings alert rules compare against, read from the config at scrape time."""

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        keep = GaugeMetricFamily(
            "patchd_group_snapshot_keep_seconds",
            "The group's snapshot.keep: how long a snapshot outlives a successful patch",
            labels=["backend", "group"],
        )
        overdue = GaugeMetricFamily(
            "patchd_group_security_max_age_seconds",
            "The baseline's security_max_age: a security update pending longer than this"
            " since patchd first saw it is overdue (groups that patch packages; absent at 0s)",
            labels=["backend", "group"],
        )
        settings = self.settings()
        for name, group in sorted(settings.groups.items()):
            keep.add_metric([group.backend, name], group.snapshot.keep.total_seconds())
            if installs_packages(settings.backends[group.backend].type, group.patch.method):
                age = (group.baseline or BaselineModel()).security_max_age.total_seconds()
                if age:
                    overdue.add_metric([group.backend, name], age)
        yield keep
        yield overdue


def daemon_collectors(
    settings: Callable[[], Settings],
    clock: Callable[[], datetime],
    snapshots: Callable[[], dict[str, datetime | None]],
    journal: Callable[[], JournalView],
) -> list[Collector]:
    """Every collector the daemon registers besides Metrics' own metrics."""
    return [
        WindowCollector(settings, clock),
        SnapshotAgeCollector(snapshots, clock),
        GroupCollector(settings),
        JournalCollector(journal),
    ]
