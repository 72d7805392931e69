"""Every metric patchd exports, named patchd_<subsystem>_<thing>_<unit>.

Metric names and labels are a contract with dashboards and alert rules: add freely,
rename never. Each Metrics object has its own registry, so tests can make fresh ones.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from patchd import __version__
from patchd.config.settings import Settings
from patchd.state import Store, StoreError
from patchd.states import RunStatus, TargetResult, TargetState

# A counter's `_created` series doubles every series and no alert rule reads it.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Patches take seconds (containers) to an hour (hosts).
_DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

# Label values the daemon creates at 0 for every configured group, so that increase() and
# rate() in alert rules see a counter's first increment.
# Every status a finished run reports (a run still `running` is not counted; one closed
# `interrupted` by a restart's reconciliation is not counted either).
RUN_STATUSES = tuple(s for s in RunStatus if s not in (RunStatus.RUNNING, RunStatus.INTERRUPTED))
# Every result counted in patchd_patch_operations (`current` and `pending` targets reached
# no end in the run: they are not operations).
RESULTS = tuple(r for r in TargetResult if r not in (TargetResult.CURRENT, TargetResult.PENDING))
GATE_CHECKS = ("before_start", "after_patch")
GATE_REASONS = ("alerts_firing", "unreachable", "bad_response", "query_error")
NOTIFICATION_RESULTS = ("sent", "retried", "dropped")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # The daemon's own memory, CPU and open files (process_*) and Python (python_info).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
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
        self.group_targets = Gauge(
            "patchd_group_targets",
            "How many targets the group's selectors found in its last completed run "
            "(0: the group selects nothing, which is logged as a warning)",
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
        self.notifications = Counter(
            "patchd_notifications",
            "Notification delivery attempts by channel and result: sent, retried (failed,"
            " tried again later) or dropped (failed its last attempt, or its channel left"
            " the config)",
            ["channel", "result"],
            registry=r,
        )

    def prepare(self, settings: Settings) -> None:
        """Create every configured group's counters at 0 (at start and on reload), and drop
        the per-target series of groups no longer configured (or on another backend)."""
        configured = {(g.backend, g.name) for g in settings.groups.values()}
        for gauge in (self.update_available, self.last_success):
            for labels in _label_sets(gauge):
                if (labels[0], labels[1]) not in configured:
                    gauge.remove(*labels)
        for labels in _label_sets(self.target_state):
            if labels[0] not in settings.groups:
                self.target_state.remove(*labels)
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
        for channel in settings.notifications:
            for outcome in NOTIFICATION_RESULTS:
                self.notifications.labels(channel, outcome)

    def reload(self, ok: bool, at: float) -> None:
        self.config_reload_ok.set(1 if ok else 0)
        if ok:
            self.config_reload_time.set(at)

    def forget_targets(self, backend: str, group: str, keep: set[str]) -> None:
        """Drop the per-target series of a group's targets not in `keep` (the targets
        its last run found): a removed target does not stay on the dashboards."""
        for gauge in (self.update_available, self.last_success):
            for labels in _label_sets(gauge):
                if labels[:2] == (backend, group) and labels[2] not in keep:
                    gauge.remove(*labels)
        for labels in _label_sets(self.target_state):
            if labels[0] == group and labels[1] not in keep:
                self.target_state.remove(*labels)

    def restore(self, settings: Settings, store: Store, limit: int = 200) -> None:
        """Rebuild from the journal what only a run would set (after a restart): each
        configured target's last successful patch, from the group's recent runs."""
        for group in settings.groups.values():
            seen: set[str] = set()
            try:
                runs = store.runs(group.name, limit=limit)
                for run in runs:  # newest first: the first commit found is the last one
                    for row in store.targets(run.id):
                        if row.state != TargetState.COMMITTED or row.name in seen:
                            continue
                        seen.add(row.name)
                        self.last_success.labels(group.backend, group.name, row.name).set(
                            row.updated.timestamp()
                        )
            except StoreError:
                return  # the journal cannot be read: the next runs set them


def _label_sets(metric: Gauge) -> list[tuple[str, ...]]:
    """The label values of every series `metric` has now."""
    return [
        tuple(sample.labels[name] for name in metric._labelnames)
        for family in metric.collect()
        for sample in family.samples
    ]
