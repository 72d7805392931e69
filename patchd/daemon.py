"""The long-running process: signals, reload, sd_notify, the metrics endpoint, timers.

Lifecycle only: what patchd does is the runtime's (patchd.runtime), when windows open is
the window module's. The main thread only waits for signals (and pets the systemd
watchdog); a signal's handler only sets a flag, and the interpreter's wakeup pipe ends
the wait. APScheduler fires one-shot date jobs at the instants patchd.windows computed —
the next time each window allows a start — at the `retry_at` of a refused run, and when
the runtime says the next retry of a failed rollback is due, so an idle daemon sleeps
until the next edge. Runs go to a bounded thread pool.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger

from patchd import __version__, log
from patchd.backends.base import Backend
from patchd.config import BackendSpec, ConfigError, Settings, load_settings
from patchd.config.reload import review
from patchd.config.settings import Group
from patchd.control.actions import open_control, reopen_control
from patchd.control.live import LiveState
from patchd.control.server import ControlServer
from patchd.engine import GateResult
from patchd.engine.target import TargetOutcome
from patchd.ha import DaemonHa
from patchd.metrics import DaemonGauges, Metrics, MetricsObserver, serve_metrics
from patchd.observers import BaseObserver, RunLog
from patchd.runtime import Refusal, Runtime
from patchd.state import Store, StoreError
from patchd.systemd import Notifier, watchdog_interval
from patchd.windows import next_start, window_now

# How long in-flight targets get to finish (or roll back) after SIGTERM.
DEFAULT_GRACE = timedelta(seconds=90)
RUN_WORKERS = 4


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Daemon:
    config: Path | None
    config_dir: Path | None
    clock: Callable[[], datetime] = utcnow
    notifier: Notifier = field(default_factory=Notifier)
    grace: timedelta = DEFAULT_GRACE
    connector: Callable[[BackendSpec], Backend] | None = None  # None: patchd.backends

    def __post_init__(self) -> None:
        self.log = log.get("patchd.daemon")
        self.metrics = Metrics()
        self.stop = threading.Event()
        self._wakeup: int | None = None  # read end of the pipe signals write to
        self._reload_requested = False
        self._stop_requested = False
        self._lock = threading.RLock()
        self._runs: dict[str, Future[None]] = {}
        self.control: ControlServer | None = None
        self.ha: DaemonHa | None = None  # leadership, with a shared store and [ha] on
        self._progress: dict[str, tuple[int, int]] = {}
        # Why the last reload was refused (the old config keeps running meanwhile), or
        # what it could not apply without a restart: shown in the status line
        # (`systemctl status`) until a reload changes it.
        self._reload_note: str | None = None
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.pool = ThreadPoolExecutor(max_workers=RUN_WORKERS, thread_name_prefix="run")

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Load config and state, serve metrics, arm the schedule, tell systemd READY."""
        settings = load_settings(self.config, self.config_dir)
        log.setup(settings.daemon.log_format, settings.daemon.log_level)
        self._log_config_warnings(settings)
        self.live = LiveState(self.clock)
        self.runtime = Runtime(
            settings,
            self.clock,
            [RunLog(), MetricsObserver(self.metrics, self.clock), _StatusObserver(self), self.live],
            self.connector,
        )
        # Reconciling and patching both need the journal: without it, do not start at all.
        self.store.check_writable()
        # Connecting and reconciling may take minutes (a vSphere revert): systemd is told
        # it is progress (EXTEND_TIMEOUT_USEC), so TimeoutStartSec stays short.
        with self.notifier.extending():
            self.runtime.connect_all()
            # What a stopped patchd left half-done, first (with leadership: on election).
            self.runtime.reconcile()
        self.metrics.reload(True, self.clock().timestamp())
        self.metrics.prepare(settings)
        self.metrics.restore(settings, self.store)  # what only runs set, after a restart
        self.gauges = DaemonGauges(self.metrics, lambda: self.runtime.settings, self.clock)
        self._refresh_snapshots()
        self.runtime.outbox.start()  # what a stopped daemon left queued goes out now
        self.metrics_server = serve_metrics(
            settings.daemon.metrics_host, settings.daemon.metrics_port, self.metrics.registry
        )
        self.scheduler.start()
        self.control = open_control(self, settings)
        if self.runtime.leading:  # a standby is READY too, but idle until elected
            self.ha = DaemonHa(
                self.runtime, self.metrics, self._elected, self._stood_down, self._wait_runs
            )
            self.ha.start()
        self._arm()
        self.log.info(
            "started",
            version=__version__,
            files=[str(p) for p in settings.files],
            metrics=f"{settings.daemon.metrics_host}:{settings.daemon.metrics_port}",
        )
        self.notifier.ready(self.status_line())
        self._run_open_windows()

    # What the runtime holds, as the daemon's tests and status see it.

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def store(self) -> Store:
        return self.runtime.store

    @property
    def backends(self) -> dict[str, Backend]:
        return self.runtime.backends

    @property
    def _gate_shut(self) -> dict[str, str]:
        return self.runtime.gate_shut

    def handle_signals(self) -> None:
        """Take SIGHUP, SIGTERM and SIGINT from now on. Called before start(): READY=1
        invites `systemctl reload`, and an unhandled SIGHUP would end the process."""
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write)  # the interpreter writes each signal's number there
        self._wakeup = read
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def serve(self) -> int:
        """Wait for signals until told to stop; returns the exit code."""
        if self._wakeup is None:
            self.handle_signals()
        assert self._wakeup is not None
        interval = watchdog_interval()
        if interval is not None:
            self.notifier.watchdog()
        while not self._stop_requested:
            select.select([self._wakeup], [], [], interval.total_seconds() if interval else None)
            with suppress(BlockingIOError):
                while os.read(self._wakeup, 512):
                    pass
            if interval is not None:
                self.notifier.watchdog()
            if self._reload_requested and not self._stop_requested:
                self._reload_requested = False
                self.reload()
        return self.shutdown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Plain assignments only: a handler runs between two bytecodes of the main
        # thread, which may hold the very lock that Event.set() would wait for, forever.
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requested = True

    def shutdown(self) -> int:
        self.log.info("stopping", grace_seconds=self.grace.total_seconds())
        self.notifier.stopping("stopping: letting in-flight targets finish")
        self.stop.set()
        self.scheduler.shutdown(wait=False)
        deadline = self.clock() + self.grace
        with self._lock:
            runs = list(self._runs.values())
        for future in runs:
            left = (deadline - self.clock()).total_seconds()
            try:
                future.result(timeout=max(0.0, left))
            except Exception as err:  # a run that outlives the grace is journaled mid-way
                self.log.error("run_not_finished_at_shutdown", error=repr(err))
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.ha is not None:
            self.ha.stop()
        if self.control is not None:
            self.control.shutdown()
        with self._lock:  # an _arm already past its stop check finishes first
            self.runtime.close()
        self.metrics_server.shutdown()
        self.log.info("stopped")
        return 0

    def reload(self) -> None:
        """Swap in a new valid config atomically; keep the old one if the new one is bad."""
        self.notifier.reloading()
        try:
            loaded = load_settings(self.config, self.config_dir)
        except ConfigError as err:
            self.log.error("reload_failed", errors=[str(issue) for issue in err.issues])
            more = f" (+{len(err.issues) - 1} more)" if len(err.issues) > 1 else ""
            first = str(err.issues[0]) if err.issues else str(err)
            return self._keep_old_config(f"reload failed, old config kept: {first}{more}")
        change = review(self.settings, loaded)
        if change.refused is not None:
            self.log.error("reload_refused", reason=change.refused)
            return self._keep_old_config(f"reload refused, old config kept: {change.refused}")
        settings = change.settings
        # Runs going on keep the backends they use; replaced ones close when they end.
        self.runtime.reload(settings)
        self.runtime.connect_all()
        self.control = reopen_control(self, self.control, settings)
        log.setup(settings.daemon.log_format, settings.daemon.log_level)
        self._log_config_warnings(settings)
        self.metrics.reload(True, self.clock().timestamp())
        self.metrics.prepare(settings)
        self._refresh_snapshots()
        self._arm()
        self._reload_note = change.note
        self.log.info(
            "reloaded",
            files=[str(p) for p in settings.files],
            groups_added=list(change.added),
            groups_removed=list(change.removed),
        )
        if change.needs_restart:
            self.log.warning("reload_needs_restart", keys=list(change.needs_restart))
        self.notifier.ready(self.status_line())
        self._run_open_windows()

    def _keep_old_config(self, why: str) -> None:
        self.metrics.reload(False, self.clock().timestamp())
        self._reload_note = why
        self.notifier.ready(self.status_line())

    def _log_config_warnings(self, settings: Settings) -> None:
        for issue in settings.warnings:
            self.log.warning(
                "config_warning",
                file=str(issue.file),
                key=".".join(issue.path),
                reason=issue.reason,
                problem=str(issue),
            )

    def _refresh_snapshots(self) -> None:
        self.gauges.refresh_snapshots(self.runtime.backends)

    def _on_alert_gate(self, group: str, check: str, answer: GateResult) -> None:
        self.runtime.alert_gate(group, check, answer)

    # --- scheduling -----------------------------------------------------------------------

    def _arm(self) -> None:
        """(Re)create one date job per window at its next start, the release job and the
        job that retries failed rollbacks."""
        with self._lock:
            # A job the scheduler let run on after shutdown (it does not wait for them):
            # nothing is armed once stopping, and the store may be closed.
            if self.stop.is_set():
                return
            now = self.clock()
            settings = self.settings
            # A standby schedules nothing that touches targets; it arms on election.
            acting = self.runtime.acting()
            for job in self.scheduler.get_jobs():
                # A stage's retry is kept on the leader; a standby has none to keep.
                stale = job.id.startswith("window:") or job.id in ("release", "rollback-retry")
                if stale or (job.id.startswith("stage:") and not acting):
                    job.remove()
            for name, window in settings.windows.items() if acting else ():
                start = next_start(window, settings.freezes, now)
                if start is not None:
                    self.scheduler.add_job(
                        self._window_fired,
                        DateTrigger(run_date=start),
                        args=[name],
                        id=f"window:{name}",
                        misfire_grace_time=None,
                        coalesce=True,
                    )
            self.gauges.refresh_journal(settings, self.store)
            retained = self.store.retained() if acting else []
            if retained:
                self.scheduler.add_job(
                    self._release,
                    DateTrigger(run_date=max(retained[0].expires, now)),
                    id="release",
                    misfire_grace_time=None,
                )
            retry_at = self.runtime.next_rollback_retry() if acting else None
            if retry_at is not None:
                self.scheduler.add_job(
                    self._retry_rollbacks,
                    DateTrigger(run_date=max(retry_at, now)),
                    id="rollback-retry",
                    misfire_grace_time=None,
                )
        self.notifier.status(self.status_line())

    def _window_fired(self, name: str) -> None:
        self.log.info("window_opened", window=name)
        self._run_window(name)
        self._arm()

    def _release(self) -> None:
        if self.stop.is_set():
            return
        try:
            count = self.runtime.release_expired()
            self.log.info("released_expired", count=count)
        except Exception as err:
            self.log.error("release_failed", error=str(err))
        self._refresh_snapshots()
        self._arm()

    def _retry_rollbacks(self) -> None:
        if self.stop.is_set():
            return
        try:
            self.runtime.retry_rollbacks()
        except Exception as err:  # a bug: logged, and not re-armed at once (no busy loop)
            self.log.error("rollback_retries_failed", error=str(err))
            return
        self._refresh_snapshots()
        self._arm()

    # --- leadership (patchd.ha calls these from its own thread) ---------------------------

    def _elected(self) -> None:
        self._arm()
        self.notifier.status(self.status_line())
        self._run_open_windows()

    def _stood_down(self) -> None:
        self._arm()  # disarms: the runs going on stop starting targets by themselves

    def _wait_runs(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for future in runs:
            with suppress(Exception):
                future.result()

    def _run_open_windows(self) -> None:
        if not self.runtime.acting():
            return
        now = self.clock()
        settings = self.settings
        for name, window in settings.windows.items():
            if window_now(window, now, settings.freezes).may_start:
                self._run_window(name)

    def _run_window(self, window: str) -> None:
        """Start the window's groups; a later stage whose earlier stage runs in the same
        window waits for it (it is started when that run ends and its soak allows)."""
        groups = [g for g in self.settings.groups.values() if g.window == window]
        names = {g.name for g in groups}
        for group in groups:
            if group.after is None or group.after not in names:
                self.start_run(group.name)

    def start_run(self, group: str, *, now: bool = False, force: bool = False) -> bool:
        """Start a run of `group` in the pool unless one is going on already (`now` and
        `force` as `patchd run`'s: `patchd trigger`)."""
        if self.stop.is_set() or self._stop_requested:
            return False
        with self._lock:
            if group in self._runs:
                return False
            self._runs[group] = self.pool.submit(self._run, group, now, force)
        return True

    def controls_changed(self) -> None:
        """An operator paused, resumed or cleared something: gauges and status follow."""
        self.gauges.refresh_journal(self.settings, self.store)
        self.notifier.status(self.status_line())

    def _run(self, group_name: str, now: bool = False, force: bool = False) -> None:
        def progress(outcome: TargetOutcome, done: int, total: int) -> None:
            self._progress[group_name] = (done, total)
            self.notifier.status(self.status_line())

        try:
            result = self.runtime.run(
                group_name, now=now, force=force, stop=self.stop, on_progress=progress
            )
        except Exception:  # logged and counted by the runtime's observers
            return
        finally:
            with self._lock:
                self._runs.pop(group_name, None)
                self._progress.pop(group_name, None)
            self.notifier.status(self.status_line())
        if isinstance(result, Refusal):
            self._retry(group_name, result)
        else:
            self._after_run(group_name)

    def _after_run(self, group_name: str) -> None:
        self._refresh_snapshots()
        self._arm()
        # Later stages in an open window go as soon as their soak allows: a refusal
        # says when.
        for group in self.settings.groups.values():
            if group.after == group_name:
                self.start_run(group.name)

    def _retry(self, group_name: str, refusal: Refusal) -> None:
        """Try a refused run again at the instant its refusal names, if any."""
        if refusal.retry_at is None or self.stop.is_set():
            return
        self.scheduler.add_job(
            self.start_run,
            DateTrigger(run_date=refusal.retry_at),
            args=[group_name],
            id=f"stage:{group_name}",
            replace_existing=True,
            misfire_grace_time=None,
        )

    # --- status ---------------------------------------------------------------------------

    def status_line(self) -> str:
        line = self._status_line()
        if self.ha is not None and not self.runtime.acting():
            leader = self.ha.leader()
            line = f"standby (leader: {leader or 'none'})"
        return f"{self._reload_note}; {line}" if self._reload_note else line

    def _status_line(self) -> str:
        with self._lock:
            running = dict(self._progress)
            busy = list(self._runs)
            held = dict(self._gate_shut)
        if busy:
            parts = []
            for group in busy:
                done, total = running.get(group, (0, 0))
                part = f"{group} {done}/{total}" if total else f"{group} starting"
                if group in held:
                    part += f" (held by the alert gate: {held[group]})"
                parts.append(part)
            return "patching: " + ", ".join(parts)
        now = self.clock()
        settings = self.settings
        upcoming = []
        for name, window in settings.windows.items():
            start = next_start(window, settings.freezes, now)
            if start is not None:
                upcoming.append((start, name))
        if not upcoming:
            return "idle; no window opens again"
        start, name = min(upcoming)
        return f"idle; next window {name} at {start:%Y-%m-%d %H:%M}Z"


class _StatusObserver(BaseObserver):
    """Tells systemd the new status line when an alert gate shuts or opens."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def alert_gate(self, group: Group, check: str, answer: GateResult, changed: bool) -> None:
        if changed:
            self.daemon.notifier.status(self.daemon.status_line())


def run_daemon(config: Path | None, config_dir: Path | None) -> int:
    daemon = Daemon(config, config_dir)
    daemon.handle_signals()
    try:
        daemon.start()
    except ConfigError:
        raise
    except (OSError, StoreError) as err:
        daemon.log.error("start_failed", error=str(err))
        print(f"patchd: cannot start: {err}", file=sys.stderr)
        return 1
    return daemon.serve()
