"""The outbox: notifications journaled in the state store, delivered by one background
thread, retried with exponential backoff, dropped after the channel's `attempts`.

`submit` (called on a run's thread by the observer) only filters, scrubs and writes
rows: it never waits for a receiver, and it never raises (a notification must not fail
a patch). `deliver_due` makes one pass over what is due and returns when the next
message is due; the thread (`start`) runs it, then sleeps until that instant or until
`submit` wakes it, so an idle daemon does nothing. Rows left at a restart are tried at
once by the next daemon (the old backoff belonged to the old process). Each attempt's
result is reported (`report(channel, result)`, result sent | retried | dropped) for the
metric patchd_notifications_total.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from patchd import log
from patchd.config.notifications import NotificationModel
from patchd.notifications.channels import Channel, DeliveryFailed, build
from patchd.notifications.events import Event
from patchd.state import Store, StoreError

# After a store error the thread waits this long before it looks again.
_STORE_RETRY = timedelta(seconds=60)


def _scrubbed(value: Any) -> Any:
    """The document with every registered secret replaced by ***, in every string."""
    if isinstance(value, str):
        return log.scrub(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v) for v in value]
    return value


class Outbox:
    def __init__(
        self,
        config: Mapping[str, NotificationModel],
        store: Store,
        clock: Callable[[], datetime],
        report: Callable[[str, str], None] = lambda channel, result: None,
        channels: Mapping[str, Channel] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.report = report
        self.log = log.get("patchd.notifications")
        self._lock = threading.Lock()
        self.channels: dict[str, Channel] = {}
        self.configure(config, channels)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Leadership: only the leader delivers (a standby that sent would send twice: its
        # "done" write is refused). The runtime sets it; `wake` on election.
        self.leading: Callable[[], bool] = lambda: True

    def wake(self) -> None:
        """Deliver what is due now (this node just became the leader)."""
        self._wake.set()

    def configure(
        self, config: Mapping[str, NotificationModel], channels: Mapping[str, Channel] | None = None
    ) -> None:
        """Take the channels of new settings (a reload); `channels` replaces the senders
        (tests). Unchanged channels keep their sender (and apprise's loaded client)."""
        built = dict(channels or {})
        with self._lock:
            for name, model in config.items():
                if name in built:
                    continue
                old = self.channels.get(name)
                built[name] = old if old is not None and old.model == model else build(name, model)
            self.channels = built

    # --- the producer side ----------------------------------------------------------------

    def submit(self, event: Event) -> int:
        """Queue the event for every channel that hears it; returns how many. Never raises."""
        try:
            with self._lock:
                names = [
                    name for name, channel in self.channels.items() if channel.hears(event.kind)
                ]
            if not names:
                return 0
            document = _scrubbed(event.document())
            self.store.enqueue_notifications(
                [(name, event.kind.value, document) for name in names], self.clock()
            )
        except Exception as err:  # a notification never fails what reported it
            self.log.error("notification_not_queued", kind=event.kind.value, error=str(err))
            return 0
        self._wake.set()
        return len(names)

    # --- the delivery side ----------------------------------------------------------------

    def deliver_due(self, everything: bool = False) -> datetime | None:
        """Try every message due now (with `everything`, every queued one), once; returns
        when the next one is due (None: the outbox is empty). StoreError propagates (the
        thread waits and tries again). A standby delivers nothing (see `leading`)."""
        if not self.leading():
            return None
        now = self.clock()
        for row in self.store.due_notifications(by=None if everything else now):
            with self._lock:
                channel = self.channels.get(row.channel)
            if channel is None:
                self.store.notification_done(row.id)
                self.log.warning(
                    "notification_dropped", channel=row.channel, kind=row.event,
                    reason="the channel is no longer configured",
                )  # fmt: skip
                self.report(row.channel, "dropped")
                continue
            attempts = row.attempts + 1
            try:
                channel.sender.send(row.document, row.id, self.clock())
            except DeliveryFailed as err:
                wait = None if err.permanent else channel.retry_after(attempts)
                if wait is None:
                    self.store.notification_done(row.id)
                    self.log.error(
                        "notification_dropped", channel=row.channel, kind=row.event,
                        attempts=attempts, error=str(err),
                    )  # fmt: skip
                    self.report(row.channel, "dropped")
                else:
                    self.store.notification_retry(row.id, attempts, self.clock() + wait, str(err))
                    self.log.warning(
                        "notification_retry", channel=row.channel, kind=row.event,
                        attempts=attempts, retry_in=wait.total_seconds(), error=str(err),
                    )  # fmt: skip
                    self.report(row.channel, "retried")
                continue
            except Exception as err:  # a sender's bug must not kill the thread: retry
                self.log.exception("notification_error", channel=row.channel, error=str(err))
                self.store.notification_retry(
                    row.id, attempts, self.clock() + _STORE_RETRY, log.scrub(str(err))
                )
                self.report(row.channel, "retried")
                continue
            self.store.notification_done(row.id)
            self.log.info("notification_sent", channel=row.channel, kind=row.event)
            self.report(row.channel, "sent")
        upcoming = self.store.due_notifications(limit=1)
        return upcoming[0].due if upcoming else None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Deliver in a background thread until `stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="notifications", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # The first pass tries everything a stopped patchd left queued, due or not: its
        # backoff belonged to that process, and the receiver may be back.
        first = True
        while not self._stop.is_set():
            self._wake.clear()
            try:
                due = self.deliver_due(everything=first)
                first = False
            except StoreError as err:
                self.log.error("notifications_store_error", error=str(err))
                due = self.clock() + _STORE_RETRY
            wait = None if due is None else max(0.0, (due - self.clock()).total_seconds())
            self._wake.wait(wait)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (what is left stays queued for the next start)."""
        thread, self._thread = self._thread, None
        self._stop.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout)

    def flush(self) -> None:
        """One delivery pass now, for a process without the thread (`patchd run`)."""
        try:
            self.deliver_due()
        except StoreError as err:
            self.log.error("notifications_store_error", error=str(err))
