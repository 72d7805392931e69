"""Every front door gives the same answer to "when", at instants around a cutoff, a
freeze's edges and both DST changes: the daemon's scheduler (which groups it starts now,
when it arms each window's job), a run's window gate, `patchd status`, `patchd plan`,
`patchd windows --json` and the patchd_window_open / next-open metrics."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd import reports
from patchd.cli import main
from patchd.daemon import Daemon
from patchd.runtime import Refusal
from patchd.systemd import Notifier
from patchd.testing import FakeBackend
from patchd.windows import next_start, window_now
from tests.conftest import write_config


def config(state: Path) -> dict[str, Any]:
    return {
        "daemon": {
            "state_dir": state,
            "metrics_address": "127.0.0.1:0",
            "log_format": "json",
            "log_level": "warning",
        },
        "windows": {
            # Saturdays 02:00-06:00 Berlin (01:00-05:00Z in November), no start in the
            # last hour.
            "cut": {
                "days": ["sat"],
                "start": "02:00",
                "duration": "4h",
                "cutoff": "1h",
                "timezone": "Europe/Berlin",
            },
            # Sundays 02:00-06:00Z, clipped by a freeze 03:00-03:30Z; the cutoff counts
            # back from each unfrozen part's end.
            "frz": {
                "days": ["sun"],
                "start": "02:00",
                "duration": "4h",
                "cutoff": "20m",
                "timezone": "UTC",
            },
            # Every day 02:30 Berlin: missing on 2026-03-29 (opens at the jump, 01:00Z),
            # twice on 2026-10-25 (opens at the first, 00:30Z).
            "dst": {
                "cron": "30 2 * * *",
                "duration": "1h",
                "cutoff": "10m",
                "timezone": "Europe/Berlin",
            },
        },
        "freezes": {
            "f": {
                "start": datetime(2026, 11, 29, 3, 0, tzinfo=UTC),
                "end": datetime(2026, 11, 29, 3, 30, tzinfo=UTC),
            }
        },
        "backends": {"d": {"type": "docker"}},
        "groups": {f"g_{name}": {"backend": "d", "window": name} for name in ("cut", "frz", "dst")},
    }


S = timedelta(seconds=1)


def z(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


CASES = [
    # the cutoff: starts end at 04:00Z (05:00 Berlin), the window at 05:00Z
    ("cut", z("2026-11-28T00:59:59")),
    ("cut", z("2026-11-28T01:00:00")),
    ("cut", z("2026-11-28T03:59:59")),
    ("cut", z("2026-11-28T04:00:00")),
    ("cut", z("2026-11-28T04:30:00")),
    # the freeze: the first part's cutoff at 02:40Z, frozen 03:00-03:30Z, open again after
    ("frz", z("2026-11-29T02:39:59")),
    ("frz", z("2026-11-29T02:40:00")),
    ("frz", z("2026-11-29T02:59:59")),
    ("frz", z("2026-11-29T03:00:00")),
    ("frz", z("2026-11-29T03:29:59")),
    ("frz", z("2026-11-29T03:30:00")),
    ("frz", z("2026-11-29T05:40:00")),
    # spring forward: 02:30 does not exist; the window opens at the jump (01:00Z)
    ("dst", z("2026-03-29T00:59:59")),
    ("dst", z("2026-03-29T01:00:00")),
    ("dst", z("2026-03-29T01:50:00")),
    # fall back: 02:30 happens twice; the window opens at the first (00:30Z)
    ("dst", z("2026-10-25T00:29:59")),
    ("dst", z("2026-10-25T00:30:00")),
    ("dst", z("2026-10-25T01:19:59")),
    ("dst", z("2026-10-25T01:20:00")),
    ("dst", z("2026-10-25T01:30:00")),
]

# What the window module says at each case, written out by hand: (may start, next start).
EXPECTED = [
    (False, z("2026-11-28T01:00:00")),
    (True, z("2026-12-05T01:00:00")),
    (True, z("2026-12-05T01:00:00")),
    (False, z("2026-12-05T01:00:00")),
    (False, z("2026-12-05T01:00:00")),
    (True, z("2026-11-29T03:30:00")),
    (False, z("2026-11-29T03:30:00")),
    (False, z("2026-11-29T03:30:00")),
    (False, z("2026-11-29T03:30:00")),
    (False, z("2026-11-29T03:30:00")),
    (True, z("2026-12-06T02:00:00")),
    (False, z("2026-12-06T02:00:00")),
    (False, z("2026-03-29T01:00:00")),
    (True, z("2026-03-30T00:30:00")),
    (False, z("2026-03-30T00:30:00")),
    (False, z("2026-10-25T00:30:00")),
    (True, z("2026-10-26T01:30:00")),
    (True, z("2026-10-26T01:30:00")),
    (False, z("2026-10-26T01:30:00")),
    (False, z("2026-10-26T01:30:00")),
]


class Recording(Daemon):
    """The real daemon, except that a run it starts is only written down and its scheduler
    is paused (the instants here are not the real clock's: a job would fire at once)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.started: list[str] = []
        start = self.scheduler.start
        self.scheduler.start = lambda *args, **kwargs: start(paused=True)  # type: ignore[method-assign]

    def start_run(self, group: str) -> bool:
        self.started.append(group)
        return True


@pytest.mark.parametrize(
    ("window", "at", "expected"), [(*c, e) for c, e in zip(CASES, EXPECTED, strict=True)]
)
def test_every_front_door_agrees_on_when(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    window: str,
    at: datetime,
    expected: tuple[bool, datetime],
) -> None:
    path = write_config(tmp_path / "patchd.toml", config(tmp_path / "state"))
    fake = FakeBackend("d")
    daemon = Recording(
        path, None, clock=lambda: at, connector=lambda spec: fake, notifier=Notifier("")
    )
    daemon.start()
    try:
        settings = daemon.settings
        group = f"g_{window}"
        answer = window_now(settings.windows[window], at, settings.freezes)
        assert (answer.may_start, answer.next_start) == expected
        may, start = expected
        assert next_start(settings.windows[window], settings.freezes, at) == start

        # The daemon: starts the group now exactly when a start is allowed, and arms the
        # window's job at the next start.
        assert (group in daemon.started) == may
        job = daemon.scheduler.get_job(f"window:{window}")
        assert job is not None and job.next_run_time == start

        # The metrics.
        registry = daemon.metrics.registry
        assert registry.get_sample_value("patchd_window_open", {"window": window}) == int(may)
        assert (
            registry.get_sample_value(
                "patchd_window_next_open_timestamp_seconds", {"window": window}
            )
            == start.timestamp()
        )

        # `patchd status` and `patchd plan`.
        iso = start.isoformat().replace("+00:00", "Z")
        [status] = [
            g for g in reports.status(settings, daemon.store, at)["groups"] if g["group"] == group
        ]
        assert (status["window_open"], status["next_opening"]) == (may, iso)
        plan = reports.plan(settings, daemon.store, {"d": fake}, group, at)
        assert (plan["window_allows_start_now"], plan["next_opening"]) == (may, iso)

        # `patchd windows --json --at`.
        capsys.readouterr()
        assert main(["windows", "-c", str(path), "--json", "--at", at.isoformat()]) == 0
        [shown] = [w for w in json.loads(capsys.readouterr().out)["windows"] if w["name"] == window]
        assert (shown["may_start_now"], shown["next_start_utc"]) == (may, iso)

        # A run's own gate: refused, for the window or the freeze, exactly when no start is
        # allowed (and with no retry instant: the window's job starts it next).
        result = daemon.runtime.run(group)
        assert isinstance(result, Refusal) != may
        if isinstance(result, Refusal):
            assert "does not allow a start now" in result.reason or "freeze 'f'" in result.reason
            assert result.retry_at is None
    finally:
        daemon.shutdown()
