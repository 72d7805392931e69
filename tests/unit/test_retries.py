"""Failed rollbacks retried by the daemon (patchd.retries): the backoff, the bound, the
journal, and a retry that really rolls the target back, with an injected clock and
FakeBackend."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd import retries
from patchd.backends.base import StepFailed
from patchd.config import load_settings
from patchd.daemon import Daemon
from patchd.notifications.events import Event
from patchd.observers import BaseObserver
from patchd.runner import group_lock
from patchd.runtime import Runtime
from patchd.state.base import TargetRow
from patchd.systemd import Notifier
from patchd.testing import FakeBackend
from tests.conftest import wait_until, window_at, write_config
from tests.unit.test_engine import Clock, fleet, group, run

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


class Now:
    """A clock the test sets."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Told(BaseObserver):
    """Keeps the events the runtime has for people."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def notify(self, event: Event) -> None:
        self.events.append(event)


def settings_at(tmp_path: Path, groups: tuple[str, ...] = ("web",)) -> dict[str, object]:
    return {
        "daemon": {"state_dir": tmp_path / "state", "metrics_address": "127.0.0.1:0"},
        # Opens in 12 hours, and not before: the daemon test's daemon starts no run.
        "windows": {"w": window_at(datetime.now(UTC) + timedelta(hours=12))},
        "backends": {"fake": {"type": "docker"}},
        "groups": {name: {"backend": "fake", "window": "w"} for name in groups},
    }


@pytest.fixture
def fake() -> FakeBackend:
    """c00 fails its verification on v2 and then its rollback: rollback_failed, on v2."""
    backend = fleet(1)
    backend.unhealthy.add("v2")
    backend.failures[("c00", "rollback")] = StepFailed("the engine is restarting")
    return backend


@pytest.fixture
def told() -> Told:
    return Told()


@pytest.fixture
def runtime(tmp_path: Path, fake: FakeBackend, told: Told) -> Iterator[Runtime]:
    settings = load_settings(write_config(tmp_path / "patchd.toml", settings_at(tmp_path)))
    the_runtime = Runtime(settings, Now(T0), [told], connector=lambda spec: fake)
    yield the_runtime
    the_runtime.close()


def failed_row(runtime: Runtime, fake: FakeBackend) -> TargetRow:
    """Run the group once: its only target ends rollback_failed; returns its row."""
    result = run(fake, runtime.store, group(), clock=Clock(T0))
    assert [o.result for o in result.outcomes] == ["rollback_failed"]
    assert fake.targets["c00"].version == "v2"
    [row] = runtime.store.targets(result.run_id)
    return row


def test_the_delays_grow_three_times_from_two_minutes_capped_at_four_hours() -> None:
    policy = retries.RetryPolicy()
    assert [policy.delay(n) / MINUTE for n in range(5)] == [2, 6, 18, 54, 162]
    assert policy.delay(5) == policy.delay(9) == timedelta(hours=4)


def test_a_retry_rolls_back_a_target_whose_rollback_failed_once(
    runtime: Runtime, fake: FakeBackend, told: Told
) -> None:
    row = failed_row(runtime, fake)
    assert runtime.next_rollback_retry() == row.updated + 2 * MINUTE
    del fake.failures[("c00", "rollback")]  # the engine is back
    clock = runtime.clock
    assert isinstance(clock, Now)
    clock.now = row.updated + MINUTE
    assert runtime.retry_rollbacks() == []  # not due yet
    assert fake.calls.count(("rollback", "c00")) == 1  # the run's own
    clock.now = row.updated + 2 * MINUTE

    [item] = runtime.retry_rollbacks()

    assert (item.target, item.was, item.now) == ("c00", "rollback_failed", "rolled_back")
    assert fake.targets["c00"].version == "v1" and not fake.targets["c00"].snapshots
    [now] = runtime.store.targets(row.run_id)
    assert now.state == "rolled_back"
    steps = [(s, p) for s, p, _ in runtime.store.journal(row.run_id, row.target)]
    assert steps[-2:] == [("rollback_retry", "intent"), ("rollback_retry", "done")]
    assert runtime.next_rollback_retry() is None
    [event] = told.events
    assert event.subject == "patchd: c00 (web) rolled back on retry 1"


def test_retries_are_bounded_with_backoff_and_the_last_failure_is_told(
    runtime: Runtime, fake: FakeBackend, told: Told
) -> None:
    row = failed_row(runtime, fake)
    clock = runtime.clock
    assert isinstance(clock, Now)
    gaps = []
    last = row.updated
    while (due := runtime.next_rollback_retry()) is not None:
        gaps.append((due - last) / MINUTE)
        clock.now = due
        [item] = runtime.retry_rollbacks()
        assert item.now == "rollback_failed"
        last = runtime.store.targets(row.run_id)[0].updated
        assert len(gaps) <= 5, gaps
    assert gaps == [2, 6, 18, 54, 162]
    assert [c for c in fake.calls if c[0] == "rollback"] == [("rollback", "c00")] * 6
    clock.now += timedelta(hours=5)
    assert runtime.retry_rollbacks() == []
    [event] = told.events  # only the last failure: every earlier one was retried
    assert event.subject == "patchd: ROLLBACK FAILED on c00 (web) after 5 retries"
    assert "the engine is restarting" in event.text
    [now] = runtime.store.targets(row.run_id)
    assert now.error is not None and "retry 5: the engine is restarting" in now.error


def test_a_group_being_run_defers_the_retry_without_spending_one(
    runtime: Runtime, fake: FakeBackend
) -> None:
    row = failed_row(runtime, fake)
    clock = runtime.clock
    assert isinstance(clock, Now)
    clock.now = row.updated + 2 * MINUTE
    with group_lock(runtime.settings, "web"):
        assert runtime.retry_rollbacks() == []
    assert retries.retries_done(runtime.store, row) == 0
    assert runtime.next_rollback_retry() == clock.now + 2 * MINUTE
    fake.up = False  # a backend that does not answer defers it too
    clock.now += 2 * MINUTE
    assert runtime.retry_rollbacks() == []
    assert retries.retries_done(runtime.store, row) == 0
    fake.up = True
    del fake.failures[("c00", "rollback")]
    clock.now += 2 * MINUTE
    [item] = runtime.retry_rollbacks()
    assert item.now == "rolled_back"


def test_old_failures_and_groups_no_longer_configured_are_left_to_a_person(
    runtime: Runtime, fake: FakeBackend, tmp_path: Path
) -> None:
    row = failed_row(runtime, fake)
    policy = retries.RetryPolicy()
    store, settings = runtime.store, runtime.settings
    assert len(retries.pending(store, settings, row.updated, policy)) == 1
    assert retries.pending(store, settings, row.updated + timedelta(days=2), policy) == []
    other = settings_at(tmp_path, groups=("db",))
    elsewhere = load_settings(write_config(tmp_path / "other.toml", other))
    assert retries.pending(store, elsewhere, row.updated, policy) == []


def test_a_target_a_later_run_worked_on_is_not_retried(runtime: Runtime, fake: FakeBackend) -> None:
    row = failed_row(runtime, fake)
    del fake.failures[("c00", "rollback")]
    fake.publish("app", "v3")  # the next window's run patches c00 to v3
    later = run(fake, runtime.store, group(), clock=Clock(row.updated + MINUTE))
    assert [o.result for o in later.outcomes] == ["success"]
    assert runtime.next_rollback_retry() is None
    clock = runtime.clock
    assert isinstance(clock, Now)
    clock.now = row.updated + timedelta(hours=1)
    assert runtime.retry_rollbacks() == []
    assert fake.targets["c00"].version == "v3"  # the later run's work stands


def test_the_daemon_retries_a_failed_rollback_when_it_is_due(
    tmp_path: Path, fake: FakeBackend
) -> None:
    path = write_config(tmp_path / "patchd.toml", settings_at(tmp_path))
    d = Daemon(path, None, connector=lambda spec: fake, notifier=Notifier(""))
    d.start()
    try:
        # The run's clock starts a minute back: its waits advance it (by ~10 s), and a
        # retry due 1 s after the failure must be due at once, not 10 s from now.
        result = run(fake, d.store, group(), clock=Clock(datetime.now(UTC) - MINUTE))
        [row] = d.store.targets(result.run_id)
        assert row.state == "rollback_failed"
        d._arm()
        job = d.scheduler.get_job("rollback-retry")
        assert job is not None and job.next_run_time == row.updated + 2 * MINUTE
        del fake.failures[("c00", "rollback")]
        d.runtime.retry_policy = retries.RetryPolicy(first=timedelta(seconds=1))
        d._arm()
        wait_until(lambda: fake.targets["c00"].version == "v1", 120, "c00 rolled back")
        wait_until(
            lambda: d.store.targets(result.run_id)[0].state == "rolled_back", 120, "journaled"
        )
        wait_until(lambda: d.scheduler.get_job("rollback-retry") is None, 120, "no more")
    finally:
        d.shutdown()
