"""Metrics: definitions (the Metrics object), the engine observer, the scrape-time
collectors (windows, snapshots, groups, the journal's view), the daemon's refreshed
gauges and the HTTP server."""

from patchd.metrics.collectors import (
    GroupCollector,
    SnapshotAgeCollector,
    WindowCollector,
    daemon_collectors,
)
from patchd.metrics.definitions import Metrics
from patchd.metrics.gauges import DaemonGauges
from patchd.metrics.ha import HaMetrics
from patchd.metrics.journal import JournalCollector, JournalView, journal_view, pending_windows
from patchd.metrics.observer import MetricsObserver
from patchd.metrics.server import MetricsServer, serve_metrics

__all__ = [
    "DaemonGauges",
    "GroupCollector",
    "HaMetrics",
    "JournalCollector",
    "JournalView",
    "Metrics",
    "MetricsObserver",
    "MetricsServer",
    "SnapshotAgeCollector",
    "WindowCollector",
    "daemon_collectors",
    "journal_view",
    "pending_windows",
    "serve_metrics",
]
