"""The leadership metrics, registered only by a daemon with leadership on (a shared
PostgreSQL store and `[ha] enabled`): a patchd on SQLite exports none of them, so the
"no leader" alert never fires for it.

- `patchd_ha_leader`: 1 on the node that holds the lease, 0 on a standby;
- `patchd_ha_takeovers_total{during_run}`: times this node became the leader after
  another holder; during_run="true" when that holder had left a run going (its targets
  are then reconciled: the "leader changed during a run" alert);
- `patchd_ha_lease_age_seconds`: on the leader, seconds since its last successful renewal
  (it steps down before it reaches the lease's length); no sample on a standby.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["HaMetrics"]


class _LeaseAge(Collector):
    def __init__(self, age: Callable[[], float | None]) -> None:
        self.age = age

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "patchd_ha_lease_age_seconds",
            "Leader only: seconds since this node last renewed its lease",
        )
        age = self.age()
        if age is not None:
            family.add_metric([], age)
        yield family


class HaMetrics:
    def __init__(self, registry: CollectorRegistry, lease_age: Callable[[], float | None]) -> None:
        self.leader = Gauge(
            "patchd_ha_leader", "1 while this node holds the leader lease", registry=registry
        )
        self.takeovers = Counter(
            "patchd_ha_takeovers",
            "Times this node became the leader after another holder; during_run: that"
            " holder had left a run going",
            ["during_run"],
            registry=registry,
        )
        for during in ("true", "false"):
            self.takeovers.labels(during)
        registry.register(_LeaseAge(lease_age))
