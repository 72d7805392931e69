"""Every metric patchd exports, named patchd_<subsystem>_<thing>_<unit>.

Metric names and labels are a contract with dashboards and alert rules: add freely,
rename never. Each Metrics object has its own registry, so tests can make fresh ones.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from patchd import __version__
from patchd.backends.base import Target
from patchd.config.settings import Group, Settings
from patchd.engine.target import TargetOutcome
from patchd.state import Store
from patchd.windows import Freeze, Window, current_opening, may_start, openings_from

# Patches take seconds (containers) to an hour (hosts).
_DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

# Label values the daemon creates at 0 for every configured group, so that increase() and
# rate() in alert rules see a counter's first increment.
RUN_STATUSES = ("completed", "halted", "window_closed", "stopped", "failed")
RESULTS = ("success", "rolled_back", "rollback_failed", "failed", "skipped")
GATE_CHECKS = ("before_start", "after_patch")
GATE_REASONS = ("alerts_firing", "unreachable", "bad_response", "query_error")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Info("patchd_build", "patchd version", registry=r)
        self.build_info.info({"version": __version__})
        self.config_reload_ok = Gauge(
            "patchd_config_last_reload_successful",
            "1 if the last config load or reload succeeded, 0 if it failed",
            registry=r,
        )
        self.config_reload_time = Gauge(
            "patchd_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully",
            registry=r,
        )
        self.update_available = Gauge(
            "patchd_target_update_available",
            "1 if the target has an update patchd has not installed yet",
            ["backend", "group", "target"],
            registry=r,
        )
        self.last_success = Gauge(
            "patchd_target_last_success_timestamp_seconds",
            "When the target was last patched successfully",
            ["backend", "group", "target"],
            registry=r,
        )
        self.operations = Counter(
            "patchd_patch_operations",
            "Targets that reached an end in a run, by result",
            ["backend", "group", "result"],
            registry=r,
        )
        self.duration = Histogram(
            "patchd_patch_duration_seconds",
            "Time from a target's start to its end (success or rollback)",
            ["backend"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.run_halted = Counter(
            "patchd_run_halted",
            "Runs halted because their error budget (max_errors) was spent",
            ["group"],
            registry=r,
        )
        self.runs = Counter(
            "patchd_runs",
            "Runs finished, by status",
            ["group", "status"],
            registry=r,
        )
        self.run_in_progress = Gauge(
            "patchd_run_in_progress",
            "1 while a run of the group is going on",
            ["group"],
            registry=r,
        )
        self.targets_pending = Gauge(
            "patchd_group_targets_pending",
            "Targets left for a later window by the group's last run",
            ["group"],
            registry=r,
        )
        self.target_state = Gauge(
            "patchd_target_step_timestamp_seconds",
            "When the target last changed state in a run",
            ["group", "target"],
            registry=r,
        )
        self.backend_up = Gauge(
            "patchd_backend_up",
            "1 if the backend's service answered its last check",
            ["backend"],
            registry=r,
        )
        self.alert_gate_blocked = Counter(
            "patchd_alert_gate_blocked",
            "Answers of a group's alert gate (health.prometheus) that held starts (check "
            "before_start) or failed a patched target (check after_patch), by reason",
            ["group", "check", "reason"],
            registry=r,
        )

    def prepare(self, settings: Settings) -> None:
        """Create every configured group's counters at 0 (at start and on reload)."""
        for group in settings.groups.values():
            self.run_halted.labels(group.name)
            for status in RUN_STATUSES:
                self.runs.labels(group.name, status)
            for result in RESULTS:
                self.operations.labels(group.backend, group.name, result)
            if group.health.prometheus is not None:
                for check in GATE_CHECKS:
                    for reason in GATE_REASONS:
                        self.alert_gate_blocked.labels(group.name, check, reason)

    def reload(self, ok: bool, at: float) -> None:
        self.config_reload_ok.set(1 if ok else 0)
        if ok:
            self.config_reload_time.set(at)


class MetricsObserver:
    """Feeds engine transitions and outcomes into Metrics."""

    def __init__(self, metrics: Metrics, clock: Any) -> None:
        self.metrics = metrics
        self.clock = clock

    def step(self, run_id: str, group: str, target: Target, state: str, **fields: Any) -> None:
        self.metrics.target_state.labels(group, target.name).set(self.clock().timestamp())

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        m = self.metrics
        name = outcome.target.name
        if outcome.result in ("current", "pending"):
            if outcome.result == "current":
                m.update_available.labels(group.backend, group.name, name).set(0)
            return
        m.operations.labels(group.backend, group.name, outcome.result).inc()
        if outcome.update is not None:
            m.duration.labels(group.backend).observe(outcome.seconds)
        if outcome.result == "success":
            m.update_available.labels(group.backend, group.name, name).set(0)
            m.last_success.labels(group.backend, group.name, name).set(self.clock().timestamp())
        elif outcome.update is not None:
            m.update_available.labels(group.backend, group.name, name).set(1)


def next_start(window: Window, freezes: tuple[Freeze, ...], after: datetime) -> datetime | None:
    """The first instant after `after` at which the window starts allowing starts."""
    for opening in openings_from(window, after, freezes):
        for part in opening.open_parts:
            if after < part.start < part.end - window.cutoff:
                return part.start
    return None


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
            is_open.add_metric([name], 1 if may_start(window, now, settings.freezes) else 0)
            start = next_start(window, settings.freezes, now)
            if start is not None:
                next_open.add_metric([name], start.timestamp())
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
        for name, group in sorted(self.settings().groups.items()):
            keep.add_metric([group.backend, name], group.snapshot.keep.total_seconds())
        yield keep


@dataclass(frozen=True)
class JournalView:
    """What the state store says, as the gauges of JournalCollector show it."""

    retained_oldest_expiry: dict[str, datetime] = field(default_factory=dict)  # by backend
    retained_items: dict[str, int] = field(default_factory=dict)  # by backend
    pending_windows: dict[str, int] = field(default_factory=dict)  # by group
    last_rollback_failed: dict[str, datetime] = field(default_factory=dict)  # by group


# Runs that left targets without their update (besides failed or pending targets).
_UNFINISHED_STATUSES = frozenset({"failed", "interrupted"})


def pending_windows(settings: Settings, store: Store, group: Group, limit: int = 200) -> int:
    """In how many windows in a row, up to the last run, the group's runs left updates not
    installed: targets pending, failed or rolled back, or the run failed or was
    interrupted. Several runs in one opening of the window count once; a run outside any
    opening (`patchd run --now`) counts on its own. A run that patched everything ends the
    streak. Windows in which the group did not run at all are not counted."""
    window = settings.windows.get(group.window)
    openings: set[object] = set()
    for run in store.runs(group.name, limit=limit):
        if run.status == "running":
            continue
        left = run.failed > 0 or bool(run.detail.get("pending"))
        if not left and run.status not in _UNFINISHED_STATUSES:
            break
        opening = None
        if window is not None and run.window == group.window:
            opening = current_opening(window, run.started, settings.freezes)
        openings.add(opening.start if opening is not None else run.id)
    return len(openings)


def journal_view(settings: Settings, store: Store) -> JournalView:
    """Read JournalView's numbers from the store (the daemon does so when it re-arms)."""
    oldest: dict[str, datetime] = {}
    items: dict[str, int] = {}
    for row in store.retained():
        items[row.backend] = items.get(row.backend, 0) + 1
        if row.backend not in oldest or row.expires < oldest[row.backend]:
            oldest[row.backend] = row.expires
    failures = store.rollback_failures()
    return JournalView(
        retained_oldest_expiry=oldest,
        retained_items=items,
        pending_windows={
            name: pending_windows(settings, store, group) for name, group in settings.groups.items()
        },
        last_rollback_failed={g: at for g, at in failures.items() if g in settings.groups},
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
        ]
        for name, documentation, label, values in families:
            family = GaugeMetricFamily(name, documentation, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            yield family


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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """The /metrics HTTP server, serving in a thread of its own with no polling loop.

    prometheus_client's start_http_server runs socketserver's serve_forever, which wakes
    every 0.5 s to look for a shutdown request: 7,200 wake-ups an hour in an idle daemon.
    This thread sleeps in select() until a scrape arrives or shutdown() wakes it.
    """

    daemon_threads = True
    timeout = 0  # handle_request() is called only once the socket is readable

    def serve_in_thread(self) -> None:
        self._wake_read, self._wake_write = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj is self._wake_read for key, _ in ready):
                    return
                self.handle_request()

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        self._wake_write.send(b"x")
        self._thread.join()
        self.server_close()
        self._wake_read.close()
        self._wake_write.close()


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` on http://HOST:PORT/metrics from a daemon thread (IPv4 or IPv6)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (MetricsServer,), {"address_family": family})
    server: MetricsServer = server_class((host, port), _QuietHandler)
    server.set_app(make_wsgi_app(registry))
    server.serve_in_thread()
    return server
