"""One patchd, as both front doors (the daemon and the `patchd` command) use it.

The runtime owns the settings in force, the state store, the pool of backends, the
observers and what a run needs around the engine: reconciling what a stopped patchd left
half-done, running a group, and retrying rollbacks that failed (patchd.retries says
when). A refused run is a value (`Refusal`) carrying its reason
and the instant it may be retried; the daemon schedules on that instant, never re-decides.

With `[state] url` the store is the shared PostgreSQL one, and (`[ha] enabled`) the
daemon puts leadership on it (`lead`): only while this node holds the lease does a run
start or a target get touched (`may_act`); reconciling runs under the same fence.

Backends are connected when first needed (the daemon connects all of them at start),
reused across reloads while their spec is unchanged; a replaced one is retired and closed
once no run can be using it, and `close()` closes them all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from patchd import acting, compliance, log, retries
from patchd.backends import connect
from patchd.backends.base import Backend
from patchd.config import BackendSpec, Settings
from patchd.config.settings import Group
from patchd.engine import GateResult, RunResult
from patchd.engine.target import TargetOutcome
from patchd.notifications import events
from patchd.notifications.events import Event
from patchd.notifications.observer import NotificationObserver
from patchd.notifications.outbox import Outbox
from patchd.observers import BaseObserver, LogObserver, Observers
from patchd.reconcile import Reconciled, reconcile
from patchd.retries import RetryPolicy
from patchd.runner import Refusal, Runner, RunRefused, hand_over
from patchd.state import StoreError, StoreProtocol
from patchd.state import open_store as open_journal
from patchd.state.leader import Change
from patchd.states import TargetState

if TYPE_CHECKING:
    from patchd.state.shared import Ha

__all__ = ["Refusal", "Runtime", "open_store"]

_NOT_LEADER = "this node is a standby: the leader runs the groups (see `patchd status`)"
_NO_LEASE = (
    "with [ha] on, only the leader daemon patches: use `patchd trigger` on it (see `patchd status`)"
)

Progress = Callable[[TargetOutcome, int, int], None]


def open_store(settings: Settings, *, readonly: bool = False) -> StoreProtocol:
    """The state store of these settings: the one place that opens it.

    readonly (the report commands): never creates or changes the journal; before the
    first run there is none, and the answer is an empty store held in memory. Written
    to, a journal root creates in a state directory another user owns (the service's)
    is handed to that owner: else the service could not open it.
    """
    if settings.state.url is not None:
        # Imported here: a patchd on SQLite never loads psycopg.
        from patchd.state.shared import open_shared

        return open_shared(settings.state, readonly=readonly)
    path = settings.daemon.state_dir / "patchd.db"
    if readonly:
        if not path.exists():
            return open_journal(Path(":memory:"))
        return open_journal(path, readonly=True)
    created = not path.exists()
    store = open_journal(path)
    if created:
        hand_over(path)
    return store


class Runtime:
    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], datetime],
        observers: Sequence[BaseObserver] = (),
        connector: Callable[[BackendSpec], Backend] | None = None,
        *,
        readonly: bool = False,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.log = log.get("patchd.runtime")
        self.connector = connector if connector is not None else connect
        self.store = open_store(settings, readonly=readonly)  # readonly: `patchd plan`
        self.readonly = readonly
        # Notifications are queued in the journal on the run's thread and delivered by
        # the outbox's own thread (the daemon starts it; `patchd run` flushes at close).
        self.outbox = Outbox(
            settings.notifications,
            self.store,
            clock,
            lambda channel, result: self.observer.notification(channel, result),
        )
        self.outbox.leading = self.acting  # with [ha], only the leader delivers
        # The engine's transitions are always logged; the front door adds its own.
        self.observer = Observers(
            [LogObserver(), *observers, NotificationObserver(self.outbox, clock)]
        )
        self._lock = threading.RLock()
        self._backends: dict[str, Backend] = {}
        self._retired: list[Backend] = []  # replaced by a reload, not closed yet
        self._active = 0  # runs going on (they may use retired backends)
        self.gate_shut: dict[str, str] = {}  # group -> reason its alert gate holds starts
        self.retry_policy = RetryPolicy()
        # group -> until when its rollback retries wait (its lock was held, or its
        # backend did not answer); a wait spends no retry.
        self._retry_held: dict[str, datetime] = {}
        self.ha: Ha | None = None  # leadership, once `lead` started it

    # --- leadership -----------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether leadership is configured: a shared store with `[ha] enabled`."""
        return self.settings.state.url is not None and self.settings.ha.enabled

    def lead(self, on_change: Callable[[Change], None]) -> None:
        """Start contending for the lease (the daemon, once): every write is fenced by it
        from now on, and `on_change` hears each change of role (from the lease's thread)."""
        from patchd.state.postgres import PostgresStore
        from patchd.state.shared import Ha

        assert isinstance(self.store, PostgresStore) and self.leading
        self.ha = Ha.start(self.store, self.settings.ha, on_change)

    @property
    def may_act(self) -> Callable[[], bool] | None:
        """What the engine asks before touching a target; None without leadership."""
        return None if self.ha is None else self.ha.may_act

    def acting(self) -> bool:
        """Whether this node may touch targets now (always without leadership; never with
        it configured but not started: `patchd run` on a node of a shared store)."""
        if self.ha is None:
            return not self.leading
        return self.ha.may_act()

    # --- backends -------------------------------------------------------------------------

    @property
    def backends(self) -> dict[str, Backend]:
        """The connected backends of the settings in force (a copy)."""
        with self._lock:
            return dict(self._backends)

    def backend(self, name: str) -> Backend:
        """The backend called `name`, connected on first use."""
        with self._lock:
            if name not in self._backends:
                self._backends[name] = self.connector(self.settings.backends[name])
            return self._backends[name]

    def connect_all(self) -> None:
        """Connect every configured backend and check that each answers."""
        for name in self.settings.backends:
            self.check(name, self.backend(name))

    def check(self, name: str, backend: Backend) -> bool:
        """Ping a backend; observers hear the answer."""
        try:
            backend.ping()
        except Exception as err:
            self.observer.backend_checked(name, str(err))
            return False
        self.observer.backend_checked(name, None)
        return True

    def reload(self, settings: Settings) -> None:
        """Swap in new settings; backends whose spec is unchanged are kept, the others
        retired (closed once no run is going on)."""
        with self._lock:
            old = self.settings
            kept: dict[str, Backend] = {}
            for name, backend in self._backends.items():
                if name in settings.backends and old.backends.get(name) == settings.backends[name]:
                    kept[name] = backend
                else:
                    self._retired.append(backend)
            self._backends = kept
            self.settings = settings
        self.outbox.configure(settings.notifications)
        self._close_retired()

    def _close_retired(self) -> None:
        with self._lock:
            if self._active:
                return
            retired, self._retired = self._retired, []
        self._close(retired)

    def close(self) -> None:
        """Close every backend and the store (at the end of the process). Without the
        delivery thread (`patchd run`), what is queued gets one delivery attempt first;
        what fails stays queued for the daemon. A read-only runtime (`patchd plan`, maybe
        beside a running daemon) delivers nothing: it could not mark a message sent, so
        the daemon would send it again."""
        with self._lock:
            backends = [*self._backends.values(), *self._retired]
            self._backends, self._retired = {}, []
        self._close(backends)
        if self.ha is not None:  # give the lease up: a standby takes over at once
            self.ha.stop()
        if self.outbox.running:
            self.outbox.stop()
        elif self.settings.notifications and not self.readonly:
            self.outbox.flush()
        self.store.close()

    def notify(self, event: Event) -> None:
        """Tell people about something outside a run (the control socket's pause, resume,
        approval needed, quarantine): observers hear it, the outbox queues it."""
        self.observer.notify(event)

    def _close(self, backends: Iterable[Backend]) -> None:
        for backend in backends:
            try:
                backend.close()
            except Exception as err:
                self.log.warning("backend_close_failed", backend=backend.name, error=str(err))

    # --- work -----------------------------------------------------------------------------

    def reconcile(self, groups: Iterable[str] | None = None) -> list[Reconciled]:
        """Finish what a stopped patchd left half-done, before anything new starts. With
        `groups`, only their backends are connected (others' targets are left alone)."""
        settings = self.settings
        if not self.acting():
            return []  # a standby: the leader reconciles (and this one on taking over)
        names = settings.groups if groups is None else groups
        backends = {
            backend: self.backend(backend)
            for backend in {settings.groups[g].backend for g in names}
        }
        with acting.guard(self.may_act):
            done = reconcile(settings, self.store, backends, self.clock)
        for item in done:
            self.observer.reconciled(item)
        return done

    def run(
        self,
        group_name: str,
        *,
        now: bool = False,
        force: bool = False,
        stop: threading.Event | None = None,
        on_progress: Progress | None = None,
    ) -> RunResult | Refusal:
        """One run of the group, or the Refusal that kept it from starting. A journal that
        cannot be written raises StoreError (nothing started); observers hear it all."""
        with self._lock:  # the group and its backend from the same settings
            settings = self.settings
            group = settings.groups.get(group_name)
            refusal = None
            if group is None:  # a reload dropped it while its run waited
                refusal = Refusal(f"group {group_name!r} is no longer configured")
            elif not self.acting():
                refusal = Refusal(_NOT_LEADER if self.ha is not None else _NO_LEASE)
            if refusal is not None:
                self.log.info("run_refused", group=group_name, reason=refusal.reason)
                return refusal
            assert group is not None
            try:
                backend = self.backend(group.backend)
            except Exception as err:
                self.observer.run_crashed(group, err)
                raise
            self._active += 1  # from here a reload retires its backend, never closes it
        self.observer.run_started(group)
        try:
            self.check(group.backend, backend)
            runner = Runner(
                settings=settings,
                store=self.store,
                backends={group.backend: backend},
                observer=self.observer,
                clock=self.clock,
                on_progress=on_progress,
                on_alert_gate=lambda name, check, answer: self._alert_gate(group, check, answer),
                may_act=self.may_act,
            )
            result = runner.run(group, now=now, force=force, stop=stop)
        except RunRefused as err:
            self.observer.run_refused(group, err.refusal)
            return err.refusal
        except StoreError as err:  # the state directory cannot be written: nothing started
            self.observer.run_failed(group, str(err))
            raise
        except Exception as err:
            self.observer.run_crashed(group, err)
            raise
        finally:
            with self._lock:
                self._active -= 1
                self.gate_shut.pop(group.name, None)
            self.observer.run_ended(group)
            self._close_retired()
        if result.status == "completed" and not result.outcomes:
            # Likely a typo in a selector: say so rather than "0 patched" in silence.
            self.log.warning(
                "group_selects_nothing",
                group=group.name,
                backend=group.backend,
                hint="no target matches the group's select; check its labels/names",
            )
        if result.outcomes and group.name in compliance.package_groups(settings, [group.name]):
            self._check_compliance(settings, group, backend)
        self.observer.run_finished(group, result)
        return result

    def _check_compliance(self, settings: Settings, group: Group, backend: Backend) -> None:
        """After a run of a group that patches packages: check its machines again and
        record what is still pending, so the metrics follow the patches (no polling)."""
        try:
            compliance.check(settings, self.store, lambda name: backend, [group.name], self.clock())
        except Exception as err:  # the run is over and journaled; this is only a report
            self.log.warning("compliance_check_failed", group=group.name, error=str(err))

    def _alert_gate(self, group: Group, check: str, answer: GateResult) -> None:
        """Tell observers each answer of the alert gate, and whether the pre-start gate
        shut, changed its reason or opened again."""
        changed = False
        if check == "before_start":
            with self._lock:
                before = self.gate_shut.pop(group.name, None)
                if not answer.open:
                    self.gate_shut[group.name] = answer.reason
            changed = (not answer.open and before != answer.reason) or (
                answer.open and before is not None
            )
        self.observer.alert_gate(group, check, answer, changed)

    def alert_gate(self, group_name: str, check: str, answer: GateResult) -> None:
        """Report an alert gate's answer for a configured group (as a run would)."""
        self._alert_gate(self.settings.groups[group_name], check, answer)

    def release_expired(self) -> int:
        """Remove what commits kept and whose time is up; returns how many were released."""
        with self._lock:
            self._active += 1
        try:
            for name in self.settings.backends:
                self.backend(name)
            runner = Runner(
                self.settings, self.store, self.backends, self.observer, self.clock,
                may_act=self.may_act,
            )  # fmt: skip
            return runner.release_expired()
        finally:
            with self._lock:
                self._active -= 1
            self._close_retired()

    # --- failed rollbacks, retried --------------------------------------------------------

    def next_rollback_retry(self) -> datetime | None:
        """When the next retry of a failed rollback is due (None: none left)."""
        due = retries.pending(self.store, self.settings, self.clock(), self.retry_policy)
        with self._lock:
            held = dict(self._retry_held)
        return min((max(d.at, held.get(d.group, d.at)) for d in due), default=None)

    def retry_rollbacks(self) -> list[Reconciled]:
        """Retry every failed rollback that is due; what became of each is logged, and
        people are told when one succeeds or the last one fails."""
        if not self.acting():
            return []  # a standby: the leader retries (fenced writes would only be refused)
        settings, policy, now = self.settings, self.retry_policy, self.clock()
        done = []
        for due in retries.pending(self.store, settings, now, policy):
            with self._lock:
                held = self._retry_held.get(due.group)
            if due.at > now or (held is not None and held > now):
                continue
            row, name = due.row, settings.groups[due.group].backend
            fields = {"group": due.group, "run_id": row.run_id, "target": row.name}
            self.log.info(retries.STEP, attempt=due.attempt, of=policy.attempts, **fields)
            with self._lock:
                self._active += 1  # a reload retires its backend, never closes it
            try:
                backend = self.backend(name)
                if not self.check(name, backend):
                    raise RunRefused(f"backend {name} does not answer")
                with acting.guard(self.may_act):
                    item = retries.retry(settings, self.store, {name: backend}, due, self.clock)
            except (RunRefused, StoreError, acting.NotActing) as err:
                with self._lock:
                    self._retry_held[due.group] = now + policy.first
                self.log.warning("rollback_retry_deferred", reason=str(err), **fields)
                continue
            finally:
                with self._lock:
                    self._active -= 1
                self._close_retired()
            done.append(item)
            failed = item.detail if item.now == TargetState.ROLLBACK_FAILED else None
            level = self.log.info if failed is None else self.log.error
            level(
                "rollback_retried", attempt=due.attempt, now=item.now, detail=item.detail, **fields
            )
            if item.now == TargetState.ROLLED_BACK or due.attempt == policy.attempts:
                self.notify(
                    events.rollback_retried(
                        row.run_id, due.group, row.name, due.attempt, failed, self.clock()
                    )
                )
        return done
