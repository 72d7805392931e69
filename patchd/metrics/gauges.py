"""The daemon's scrape-time gauges and what they read: snapshot ages and the journal's
view, refreshed when the daemon re-arms (at start, on reload, after every run and
release), so that a scrape never calls a backend or reads the store."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from patchd import log
from patchd.backends.base import Backend, ListsSnapshots
from patchd.config.settings import Settings
from patchd.metrics.collectors import daemon_collectors
from patchd.metrics.definitions import Metrics
from patchd.metrics.journal import JournalView, journal_view
from patchd.state import Store, StoreError
from patchd.states import RunStatus


class DaemonGauges:
    """Registers the daemon's collectors on `metrics` and holds what they show."""

    def __init__(
        self,
        metrics: Metrics,
        settings: Callable[[], Settings],
        clock: Callable[[], datetime],
    ) -> None:
        self.metrics = metrics
        self.log = log.get("patchd.daemon")
        self.oldest_snapshot: dict[str, datetime | None] = {}
        self.journal = JournalView()
        for collector in daemon_collectors(
            settings, clock, lambda: dict(self.oldest_snapshot), lambda: self.journal
        ):
            metrics.registry.register(collector)

    def refresh_snapshots(self, backends: Mapping[str, Backend]) -> None:
        """Re-read when each snapshot-keeping backend's oldest patchd snapshot was taken."""
        found: dict[str, datetime | None] = {}
        for name, backend in backends.items():
            if not isinstance(backend, ListsSnapshots):
                continue
            try:
                created = [s.created for s in backend.patchd_snapshots() if s.created]
            except Exception as err:
                self.log.warning("snapshot_listing_failed", backend=name, error=str(err))
                continue
            found[name] = min(created) if created else None
        self.oldest_snapshot = found

    def refresh_journal(self, settings: Settings, store: Store) -> None:
        """Re-read the store's gauges: what is kept after commits, pending windows, failed
        rollbacks, and each group's pending targets (so they survive a restart)."""
        try:
            self.journal = journal_view(settings, store)
            for name in settings.groups:
                last = store.last_run(name)
                if last is not None and last.status != RunStatus.RUNNING:
                    pending = len(last.detail.get("pending", []))
                    self.metrics.targets_pending.labels(name).set(pending)
        except StoreError as err:
            self.log.error("journal_metrics_failed", error=str(err))
