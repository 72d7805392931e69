"""What each control verb does to the running daemon, and the audit of every request.

The decisions themselves live lower down: a pause, an approval and a quarantine are
values of patchd.engine.controls, held by the runner and the engine; the stage gate
(engine.stages) says what an approval pins. Here a verb checks its groups, stores the
control, and has the daemon start what may start now (a resumed or approved group whose
window is open, a triggered one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.date import DateTrigger

from patchd import log, reports
from patchd.config import Settings
from patchd.control.client import daemon_running
from patchd.control.live import LiveState
from patchd.control.protocol import ProtocolError, Verb
from patchd.control.server import ControlServer, Peer, SocketBusy, serve_control
from patchd.durations import parse_duration
from patchd.engine.controls import (
    PAUSE,
    Pause,
    approve,
    clear_quarantine,
    pauses,
    quarantine_listing,
)
from patchd.engine.stages import approvable, stage_gate
from patchd.notifications import events
from patchd.runtime import Runtime
from patchd.state import Store, StoreError
from patchd.windows import window_now


class Steered(Protocol):
    """What the verbs need of the daemon (patchd.daemon.Daemon)."""

    @property
    def clock(self) -> Callable[[], datetime]: ...

    @property
    def scheduler(self) -> BaseScheduler: ...

    @property
    def live(self) -> LiveState: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> Store: ...

    def start_run(self, group: str, *, now: bool = False, force: bool = False) -> bool: ...

    def controls_changed(self) -> None: ...

    @property
    def runtime(self) -> Runtime: ...


def open_control(daemon: Steered, settings: Settings) -> ControlServer | None:
    """Serve the control socket of these settings for `daemon`. A socket that cannot be
    made is logged and patchd goes on without it: patching matters more than steering."""
    path = settings.daemon.control_socket
    logger = log.get("patchd.control")
    busy = (f"another patchd daemon serves {path}: this one serves no control socket (give"
            " each daemon on this host its own daemon.control_socket)")  # fmt: skip
    if daemon_running(path):
        logger.error("control_socket_busy", socket=str(path), problem=busy)
        return None
    actions = Actions(daemon)
    try:
        server = serve_control(path, settings.daemon.control_group, actions.dispatch, actions.audit)
    except SocketBusy:  # one starting at the same instant
        logger.error("control_socket_busy", socket=str(path), problem=busy)
        return None
    except OSError as err:
        logger.error("control_socket_failed", socket=str(path), error=str(err))
        return None
    logger.info("control_socket", socket=str(path), group=settings.daemon.control_group)
    return server


def reopen_control(
    daemon: Steered, current: ControlServer | None, settings: Settings
) -> ControlServer | None:
    """After a reload: the control socket these settings ask for. A new path is served
    first and the old socket closed after (clients never find none); a new group only
    changes the socket's owner; if the new one cannot be made, the old one keeps serving."""
    path, group = settings.daemon.control_socket, settings.daemon.control_group
    if current is not None and current.path == path:
        if current.group != group:
            try:
                current.regroup(group)
            except OSError as err:  # the socket serves on; its owner is what it was
                log.get("patchd.control").error("control_group_failed", socket=str(path),
                                                group=group, error=str(err))  # fmt: skip
        return current
    moved = open_control(daemon, settings)
    if moved is None and current is not None:
        log.get("patchd.control").error(
            "control_socket_not_moved", socket=str(path), kept=str(current.path),
            problem=f"daemon.control_socket {path} cannot be served: the control socket"
            f" stays at {current.path} until a reload or restart that can",
        )  # fmt: skip
        return current
    if current is not None:
        current.shutdown()
        log.get("patchd.control").info("control_socket_moved", socket=str(path),
                                       was=str(current.path))  # fmt: skip
    return moved


class Actions:
    def __init__(self, daemon: Steered) -> None:
        self.daemon = daemon
        self.log = log.get("patchd.control")

    # --- the audit trail ------------------------------------------------------------------

    def audit(self, peer: Peer, action: str, body: dict[str, Any], allowed: bool, why: str) -> None:
        """Log and journal who asked for what (refusals too): who, what, when, why."""
        fields = {"uid": peer.uid, "pid": peer.pid, "user": peer.user, "action": action,
                  "allowed": allowed, "because": why, **body}  # fmt: skip
        if allowed:
            self.log.info("control_request", **fields)
        else:
            self.log.warning("control_refused", **fields)
        if action in ("status", "quarantine") and allowed:
            return  # reads change nothing: the log is enough
        try:
            self.daemon.store.audit(
                self.daemon.clock(), peer.uid, peer.pid, peer.user,
                action if allowed else f"refused {action}",
                body.get("group"), {**body, "because": why},
            )  # fmt: skip
        except StoreError as err:
            self.log.error("control_audit_failed", action=action, error=str(err))

    # --- verbs ----------------------------------------------------------------------------

    def dispatch(self, verb: Verb, body: dict[str, Any], peer: Peer) -> tuple[int, dict[str, Any]]:
        handler = getattr(self, "do_" + verb.name.replace("-", "_"))
        try:
            reply: dict[str, Any] = handler(body, peer)
        except StoreError as err:
            raise ProtocolError(500, f"{verb.name}: the journal cannot be used: {err}") from None
        return 200, {"ok": True, **reply}

    def _groups(self, body: dict[str, Any]) -> list[str]:
        known = self.daemon.settings.groups
        wanted = list(known) if body.get("all") else list(body.get("groups") or [body["group"]])
        unknown = [g for g in wanted if g not in known]
        if unknown:
            raise ProtocolError(
                404, f"unknown group {', '.join(unknown)} (known: {', '.join(known) or 'none'})"
            )
        return wanted

    def _start_if_open(self, group: str) -> bool:
        """Start a run of the group if its window allows a start now (the runner still
        applies every gate)."""
        daemon = self.daemon
        daemon.controls_changed()
        settings = daemon.settings
        if group not in settings.groups:
            return False
        window = settings.windows[settings.groups[group].window]
        if window_now(window, daemon.clock(), settings.freezes).may_start:
            return daemon.start_run(group)
        return False

    def do_status(self, body: dict[str, Any], peer: Peer) -> dict[str, Any]:
        daemon = self.daemon
        now = daemon.clock()
        settings, store = daemon.settings, daemon.store
        waiting = {g: p.describe() for g, p in pauses(store, now).items() if g in settings.groups}
        for group in settings.groups.values():
            if group.approval == "manual" and group.name not in waiting:
                gate = stage_gate(group, store, now)
                if not gate.open and gate.reason.startswith("awaiting approval"):
                    waiting[group.name] = gate.reason
        ha = daemon.runtime.ha  # leadership: this node's name and role; else None
        role = None if ha is None else "leader" if ha.may_act() else "standby"
        live = {
            "pid": os.getpid(),
            "at": now.isoformat(),
            "runs": daemon.live.snapshot(now),
            "waiting": waiting,
            "node": None if ha is None else ha.node,
            "role": role,
        }
        return {"live": live, "journal": reports.status(settings, store, now)}

    def do_pause(self, body: dict[str, Any], peer: Peer) -> dict[str, Any]:
        daemon = self.daemon
        now = daemon.clock()
        until: datetime | None = None
        if body.get("for"):
            until = now + parse_duration(body["for"])
        done = {}
        for group in self._groups(body):
            pause = Pause(group, now, until, str(body.get("reason", "")), peer.user)
            daemon.store.put_control(PAUSE, group, "", pause.data(), now)
            done[group] = pause.describe()
            self.log.info("paused", group=group, until=until, reason=pause.reason, by=peer.user)
            daemon.runtime.observer.operator(group, "paused", peer.user, pause.describe())
            if until is not None:  # when it ends inside an open window, start again
                daemon.scheduler.add_job(
                    self._start_if_open, DateTrigger(run_date=until), args=[group],
                    id=f"unpause:{group}", replace_existing=True, misfire_grace_time=None,
                )  # fmt: skip
        daemon.controls_changed()
        if done:
            daemon.runtime.notify(
                events.paused(list(done), peer.user, now, str(body.get("reason", "")), until)
            )
        return {"paused": done}

    def do_resume(self, body: dict[str, Any], peer: Peer) -> dict[str, Any]:
        daemon = self.daemon
        resumed, started = [], []
        for group in self._groups(body):
            if daemon.store.drop_control(PAUSE, group):
                resumed.append(group)
                self.log.info("resumed", group=group, by=peer.user)
                daemon.runtime.observer.operator(group, "resumed", peer.user, "resumed")
            if self._start_if_open(group):
                started.append(group)
        daemon.controls_changed()
        if resumed:
            daemon.runtime.notify(events.resumed(resumed, peer.user, daemon.clock()))
        return {"resumed": resumed, "started": started}

    def do_approve(self, body: dict[str, Any], peer: Peer) -> dict[str, Any]:
        daemon = self.daemon
        [group] = self._groups(body)
        now = daemon.clock()
        pins, why = approvable(daemon.settings.groups[group], daemon.store, now)
        if pins is None:
            raise ProtocolError(409, f"cannot approve {group}: {why}")
        approval = approve(daemon.store, group, pins, peer.user, now)
        self.log.info("approved", group=group, by=peer.user, pins=pins)
        daemon.runtime.observer.operator(group, "approved", peer.user, approval.describe())
        started = self._start_if_open(group)
        return {"approval": approval.describe(), "pins": pins, "started": started}

    def do_trigger(self, body: dict[str, Any], peer: Peer) -> dict[str, Any]:
        [group] = self._groups(body)
        force = bool(body.get("force"))
        if not self.daemon.runtime.acting():
            raise ProtocolError(409, "this node is a standby: trigger the leader (patchd status)")
        if not self.daemon.start_run(group, now=True, force=force):
            raise ProtocolError(409, f"a run of {group} is going on already (or patchd stops)")
        return {"started": group, "force": force}

    def do_quarantine(self, body: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return {"groups": quarantine_listing(self.daemon.store, self.daemon.settings.groups)}

    def do_quarantine_clear(self, body: dict[str, Any], peer: Peer) -> dict[str, Any]:
        [group] = self._groups(body)
        version = body.get("version")
        count = clear_quarantine(self.daemon.store, group, version)
        if version is not None and not count:
            raise ProtocolError(404, f"{group} has no quarantined version {version!r}")
        self.log.info("quarantine_cleared", group=group, version=version, count=count,
                      by=peer.user)  # fmt: skip
        self.daemon.runtime.observer.operator(
            group, "quarantine_cleared", peer.user, f"{count} version(s): {version or 'all'}"
        )
        self.daemon.controls_changed()
        return {"cleared": count}
