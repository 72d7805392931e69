"""A daemon's leadership (several daemons on one PostgreSQL store, `[ha]`): what the
daemon does when this node becomes the leader or stops being it.

The lease itself (when to take, renew or give it up, the fence on every write) is
patchd.state.leader's; the runtime starts it (`Runtime.lead`) and asks it before touching
a target. This module only reacts to its changes of role, off the lease's thread (a
renewal must never wait behind a vSphere revert):

- elected: wait for this node's own runs of a previous term to end, reconcile what the
  previous leader left unfinished (the restart reconciliation, under the fence), then
  re-arm the windows and start the groups of any window open now (an open window goes on);
- stepped down: disarm the windows; runs going on stop starting targets by themselves
  (the engine asks `may_act`), and what they cannot journal is left for the next leader.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

from patchd import log
from patchd.metrics import HaMetrics, Metrics
from patchd.runtime import Runtime
from patchd.state import StoreError
from patchd.state.leader import Change, Role
from patchd.states import RunStatus

__all__ = ["DaemonHa"]

RETRY = 5.0  # seconds between attempts at a takeover's reconciliation that failed


class DaemonHa:
    def __init__(
        self,
        runtime: Runtime,
        metrics: Metrics,
        on_lead: Callable[[], None],
        on_standby: Callable[[], None],
        wait_runs: Callable[[], None],
    ) -> None:
        self.runtime = runtime
        self.on_lead = on_lead
        self.on_standby = on_standby
        self.wait_runs = wait_runs
        self.log = log.get("patchd.ha")
        self.metrics = HaMetrics(metrics.registry, self._lease_age)
        self.metrics.leader.set(0)
        # One thread: takeovers are handled one after the other, in order.
        self._work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchd-takeover")
        self._stopped = False
        self._halt = threading.Event()  # set at shutdown: a retry's wait ends

    def start(self) -> None:
        self.runtime.lead(self._changed)

    def stop(self) -> None:
        """At shutdown: no more takeover work (the lease is given up after the runs end,
        and that step-down needs no disarming)."""
        self._stopped = True
        self._halt.set()
        self._work.shutdown(wait=False, cancel_futures=True)

    def _submit(self, work: Callable[..., None], *args: Any) -> None:
        if not self._stopped:
            with suppress(RuntimeError):  # shut down meanwhile
                self._work.submit(work, *args)

    def _lease_age(self) -> float | None:
        ha = self.runtime.ha
        return None if ha is None else ha.status().lease_age

    def leader(self) -> str:
        """The node that leads as this one last saw the lease ("" if none)."""
        ha = self.runtime.ha
        return "" if ha is None else ha.status().leader.split("/")[0]

    def _changed(self, change: Change) -> None:
        """From the lease's thread: note the change, hand the work to our own thread."""
        if change.role is Role.STANDBY:
            self.metrics.leader.set(0)
            level = self.log.info if self._stopped else self.log.warning  # shutdown: expected
            level("stepped_down", epoch=change.epoch, reason=change.reason)
            self._submit(self.on_standby)
            return
        self.metrics.leader.set(1)
        self.log.info(
            "elected", epoch=change.epoch, previous=change.previous_holder or None,
            reason=change.reason,
        )  # fmt: skip
        self._submit(self._took_over, change)

    def _took_over(self, change: Change) -> None:
        if not self.runtime.acting():
            return  # lost again meanwhile: the next election does this
        self.wait_runs()  # a run of this node's previous term holds its group's lock
        if change.previous_holder:
            try:
                runs = self.runtime.store.runs(limit=50)
                running = any(r.status == RunStatus.RUNNING for r in runs)
            except StoreError:
                running = False
            self.metrics.takeovers.labels("true" if running else "false").inc()
            self.log.warning(
                "took_over", previous=change.previous_holder, epoch=change.epoch,
                during_run=running,
            )  # fmt: skip
        while True:  # nothing new starts before what was left is ended
            try:
                done = self.runtime.reconcile()
                break
            except Exception as err:  # the database or a backend failed (or lease lost)
                self.log.error("takeover_reconcile_failed", error=str(err), retry_in=RETRY)
            if self._halt.wait(RETRY) or not self.runtime.acting():
                return
        self.log.info("takeover_reconciled", targets=len(done))
        if self.runtime.acting():
            self.runtime.outbox.wake()  # what a previous leader left queued goes out
            self.on_lead()
