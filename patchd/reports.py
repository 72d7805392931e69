"""What `patchd windows`, `plan`, `status` and `history` show: JSON-able data, then text.

Every answer to "when" comes from patchd.windows, as the daemon's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from patchd import versions
from patchd.backends.base import Backend, NotNow, NotRunning, Update
from patchd.config.settings import Group, Settings
from patchd.durations import format_duration
from patchd.engine import dependency_order, stage_gate
from patchd.engine.controls import pause_of, quarantined
from patchd.engine.packages import StoreFirstSeen, assess, held_summary
from patchd.engine.rollout import partition_limits
from patchd.guest.assessment import Assessment
from patchd.state import Store
from patchd.windows import (
    WEEKDAYS,
    Cron,
    MonthlyOrdinal,
    Opening,
    Window,
    openings_from,
    window_now,
)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def plan(
    settings: Settings,
    store: Store,
    backends: Mapping[str, Backend],
    group_name: str,
    now: datetime,
) -> dict[str, Any]:
    """What the next run of a group would do. Reads only: no pull, no change."""
    group = settings.groups[group_name]
    window = settings.windows[group.window]
    backend = backends[group.backend]
    gate = stage_gate(group, store, now)
    answer = window_now(window, now, settings.freezes)
    held = quarantined(store, [group.name, group.after])
    doc: dict[str, Any] = {
        "group": group.name,
        "backend": group.backend,
        "window": group.window,
        "window_allows_start_now": answer.may_start,
        "next_opening": _iso(answer.next_start),
        "stage_gate": {"open": gate.open, "reason": gate.reason, "pins": gate.pins},
        "max_concurrency": str(group.max_concurrency),
        "max_errors": str(group.max_errors),
        **_controls(store, group, now),
        "targets": [],
    }
    try:
        targets = dependency_order(backend.discover(group.select))
    except Exception as err:
        doc["error"] = f"discovering targets: {err}"
        return doc
    limits = partition_limits(group, targets)
    doc["max_errors_resolved"] = group.max_errors.resolve(len(targets))
    slots: dict[str | None, int] = {}
    seen = StoreFirstSeen(store, record=False)  # plan writes nothing

    def check(target: Any) -> tuple[Assessment | None, Update | None] | BaseException:
        try:
            found = assess(backend, target, gate.pins, group, seen, now)
            if found is not None:  # a package backend: its group's baseline decides
                return found, found.update
            return None, backend.check_update(target, gate.pins, group.patch)
        except Exception as err:
            return err

    # Checked as a run would (up to max_concurrency at once): a check may be slow (an SSH
    # login, apt-get update), and the plan of a fleet should not take N times that.
    workers = max(1, min(len(targets), sum(limits.values())))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plan") as pool:
        checks = list(pool.map(check, targets))
    for target, checked in zip(targets, checks, strict=True):
        entry: dict[str, Any] = {"name": target.name, "id": target.id, "kind": target.kind}
        found, update = (None, checked) if isinstance(checked, BaseException) else checked
        if found is not None:
            entry.update(_packages(found))
        if isinstance(update, NotNow):  # a run would leave it pending
            entry.update(action="wait", reason=str(update))
            doc["targets"].append(entry)
            continue
        if isinstance(update, NotRunning):  # a run would skip it
            entry.update(action="skip", reason=f"not running: {update}")
            doc["targets"].append(entry)
            continue
        if isinstance(update, BaseException):
            entry.update(action="error", error=str(update))
            doc["targets"].append(entry)
            continue
        if update is None and found is not None and found.decision.held:
            entry.update(action="hold", reason=held_summary(found, group))
        elif update is None:
            entry["action"] = "none (current)"
        elif (update.ref, update.available) in held:
            entry.update(action="skip", reason=held[(update.ref, update.available)].describe())
        elif group.after is not None and gate.pins.get(update.ref) != update.available:
            entry.update(action="skip", reason=f"{update.ref} not verified by {group.after!r}")
        else:
            index = slots.get(target.partition, 0)
            slots[target.partition] = index + 1
            entry.update(
                action="patch",
                ref=update.ref,
                current=update.current,
                available=update.available,
                change=versions.change(update.ref, update.current, update.available),
                batch=index // limits[target.partition] + 1,
            )
        if target.depends_on:
            entry["depends_on"] = list(target.depends_on)
        doc["targets"].append(entry)
    return doc


def _packages(found: Assessment) -> dict[str, Any]:
    """A package backend's plan for a target: the exact versions a run installs, what the
    baseline holds back (and until when), and whether the machine asks for a reboot."""
    by_name = {p.package: p for p in found.pending}
    return {
        "packages": [
            {"package": name, "installed": by_name[name].installed if name in by_name else None,
             "version": version, "security": name in by_name and by_name[name].security}
            for name, version in sorted(found.versions.items())
        ],
        "held": [h.as_dict() for h in found.decision.held],
        "reboot_required": found.reboot_required,
    }  # fmt: skip


def _controls(store: Store, group: Group, now: datetime) -> dict[str, Any]:
    """The operators' controls on a group: its pause, its quarantined versions."""
    paused = pause_of(store, group.name, now)
    return {
        "paused": None if paused is None else paused.describe(),
        "quarantined": [q.as_dict() | {"describe": q.describe()}
                        for q in quarantined(store, [group.name]).values()],
    }  # fmt: skip


def _render_controls(doc: Mapping[str, Any]) -> list[str]:
    lines = [f"  PAUSED: {doc['paused']}"] if doc.get("paused") else []
    lines.extend(f"  quarantined: {q['describe']}" for q in doc.get("quarantined", []))
    return lines


def render_plan(doc: Mapping[str, Any]) -> str:
    gate = doc["stage_gate"]
    lines = [
        f"group {doc['group']} (backend {doc['backend']}, window {doc['window']}, "
        f"max_concurrency {doc['max_concurrency']}, max_errors {doc['max_errors']})",
        f"  window: {'allows a start now' if doc['window_allows_start_now'] else 'shut now'}; "
        f"next opening {doc['next_opening'] or 'never'}",
        f"  stage gate: {'open' if gate['open'] else 'SHUT'}: {gate['reason']}",
        *_render_controls(doc),
    ]
    if "error" in doc:
        lines.append(f"  ERROR {doc['error']}")
    for t in doc["targets"]:
        if t["action"] == "patch":
            lines.append(f"  batch {t['batch']}: {t['name']}  {t['ref']}  {t['change']}")
        else:
            detail = t.get("reason") or t.get("error") or ""
            lines.append(f"  {t['action']}: {t['name']}" + (f"  ({detail})" if detail else ""))
        lines.extend(_render_packages(t))
    if not doc["targets"] and "error" not in doc:
        lines.append("  no targets match the group's selectors")
    return "\n".join(lines)


def _render_packages(entry: Mapping[str, Any]) -> list[str]:
    lines = []
    if entry["action"] == "patch":
        for p in entry.get("packages", []):
            kind = " (security)" if p["security"] else ""
            lines.append(
                f"      {p['package']} {p['installed'] or '(new)'} -> {p['version']}{kind}"
            )
    for h in entry.get("held", []):
        lines.append(f"      held: {h['package']} {h['candidate']}: {h['reason']}")
    if entry.get("reboot_required"):
        lines.append(f"      reboot required: {entry['reboot_required']}")
    return lines


def status(settings: Settings, store: Store, now: datetime) -> dict[str, Any]:
    groups = []
    for group in settings.groups.values():
        window = settings.windows[group.window]
        last = store.last_run(group.name)
        answer = window_now(window, now, settings.freezes)
        gate = stage_gate(group, store, now)
        groups.append(
            {
                "group": group.name,
                "backend": group.backend,
                "window": group.window,
                # What the daemon acts on: open, unfrozen and before the cutoff.
                "window_open": answer.may_start,
                "next_opening": _iso(answer.next_start),
                "after": group.after,
                "stage_gate": {"open": gate.open, "reason": gate.reason},
                **_controls(store, group, now),
                "last_run": None
                if last is None
                else {
                    "id": last.id,
                    "status": last.status,
                    "started": _iso(last.started),
                    "finished": _iso(last.finished),
                    "total": last.total,
                    "succeeded": last.succeeded,
                    "failed": last.failed,
                },
                "pending": list(last.detail.get("pending", [])) if last else [],
            }
        )
    unfinished = [
        {"run_id": t.run_id, "target": t.name, "state": t.state, "since": _iso(t.updated)}
        for t in store.unfinished_targets()
    ]
    needs_person: dict[str, list[dict[str, Any]]] = {"rollback_failed": [], "out_of_service": []}
    for run in store.runs(limit=1000):
        for row in store.targets(run.id):
            if row.state in needs_person:
                entry = {"run_id": run.id, "target": row.name, "error": row.error}
                needs_person[row.state].append(entry)
    retained = [
        {
            "backend": r.backend,
            "target": r.target,
            "what": r.description,
            "expires": _iso(r.expires),
        }
        for r in store.retained()
    ]
    return {
        "at": _iso(now),
        "groups": groups,
        "unfinished": unfinished,
        **needs_person,
        "retained": retained,
        **({"leader": leader(store)} if settings.state.url is not None else {}),
    }


def leader(store: Store) -> dict[str, Any]:
    """Who leads, from the lease row of a shared store (any node, even with no daemon)."""
    from patchd.state.postgres import PostgresStore
    from patchd.state.shared import leader_of

    assert isinstance(store, PostgresStore)
    view = leader_of(store)
    valid = bool(view.holder) and view.remaining > 0
    return {
        "node": view.holder.split("/")[0] if valid else None,
        "holder": view.holder or None,
        "epoch": view.epoch,
        "expires_in": round(view.remaining, 1) if valid else None,
        "renewed_ago": round(view.age, 1) if view.holder else None,
    }


def _render_leader(lead: Mapping[str, Any]) -> str:
    if lead["node"] is None:
        last = f" (last: {lead['holder']}, epoch {lead['epoch']})" if lead["holder"] else ""
        return f"leader: NONE, the lease is free or expired{last}"
    return (
        f"leader: {lead['node']} ({lead['holder']}, epoch {lead['epoch']}, renewed"
        f" {lead['renewed_ago']:g}s ago, expires in {lead['expires_in']:g}s)"
    )


def render_status(doc: Mapping[str, Any]) -> str:
    lines = [_render_leader(doc["leader"])] if "leader" in doc else []
    for g in doc["groups"]:
        last = g["last_run"]
        run_text = (
            "never run"
            if last is None
            else f"last run {last['id']} {last['status']}: {last['succeeded']}/{last['total']} "
            f"patched, {last['failed']} failed, started {last['started']}"
        )
        lines.append(f"{g['group']}: {run_text}")
        window_text = "open now" if g["window_open"] else f"next opening {g['next_opening']}"
        lines.append(f"  window {g['window']}: {window_text}")
        if g["after"]:
            state = "open" if g["stage_gate"]["open"] else "shut"
            lines.append(f"  after {g['after']}: gate {state}: {g['stage_gate']['reason']}")
        lines.extend(_render_controls(g))
        if g["pending"]:
            lines.append(f"  pending: {', '.join(g['pending'])}")
    if doc["unfinished"]:
        lines.append("unfinished targets (a patchd stopped while working on them):")
        lines.extend(
            f"  {u['target']} in run {u['run_id']}: {u['state']}" for u in doc["unfinished"]
        )
    if doc["rollback_failed"]:
        lines.append("ROLLBACK FAILED, needs a person:")
        lines.extend(
            f"  {r['target']} in run {r['run_id']}: {r['error']}" for r in doc["rollback_failed"]
        )
    if doc["out_of_service"]:
        lines.append("OUT OF SERVICE (left in maintenance mode), needs a person:")
        lines.extend(
            f"  {r['target']} in run {r['run_id']}: {r['error']}" for r in doc["out_of_service"]
        )
    if doc["retained"]:
        lines.append("kept after commit:")
        lines.extend(f"  {r['target']}: {r['what']} until {r['expires']}" for r in doc["retained"])
    return "\n".join(lines) if lines else "no groups configured"


def history(store: Store, group: str | None, limit: int) -> list[dict[str, Any]]:
    runs = []
    for run in store.runs(group, limit=limit):
        runs.append(
            {
                "id": run.id,
                "group": run.group,
                "window": run.window,
                "status": run.status,
                "started": _iso(run.started),
                "finished": _iso(run.finished),
                "total": run.total,
                "succeeded": run.succeeded,
                "failed": run.failed,
                "error": run.detail.get("error"),
                "targets": [
                    {
                        "target": t.name,
                        "state": t.state,
                        "from": t.version_from,
                        "to": t.version_to,
                        # A Docker target's snapshot names its image reference.
                        "change": versions.change(
                            (t.snapshot or {}).get("image"), t.version_from, t.version_to
                        )
                        if t.version_to
                        else None,
                        "error": t.error,
                    }
                    for t in store.targets(run.id)
                ],
            }
        )
    return runs


def render_history(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "no runs recorded"
    lines = []
    for run in runs:
        lines.append(
            f"{run['started']} {run['group']} run {run['id']}: {run['status']}, "
            f"{run['succeeded']}/{run['total']} patched, {run['failed']} failed"
        )
        if run["error"]:
            lines.append(f"  error: {run['error']}")
        for t in run["targets"]:
            change = f" {t['change']}" if t.get("change") else ""
            error = f"  ({t['error']})" if t["error"] else ""
            lines.append(f"  {t['target']}: {t['state']}{change}{error}")
    return "\n".join(lines)


# --- windows ------------------------------------------------------------------------------


def describe(window: Window) -> str:
    """A short human description of a window's schedule."""
    schedule = window.schedule
    if isinstance(schedule, Cron):
        text = f"cron {schedule.expr!r}"
    elif isinstance(schedule, MonthlyOrdinal):
        ordinal = "last" if schedule.ordinal == -1 else f"#{schedule.ordinal}"
        text = f"monthly {ordinal} {WEEKDAYS[schedule.weekday]}"
        if schedule.offset_days:
            text += f" {schedule.offset_days:+d}d"
        text += f" {schedule.start:%H:%M}"
    else:
        days = ",".join(WEEKDAYS[d] for d in sorted(schedule.days))
        text = f"weekly {days} {schedule.start:%H:%M}"
    text += f", {format_duration(window.duration)}, {window.tz.key}"
    if window.cutoff:
        text += f", cutoff {format_duration(window.cutoff)}"
    return text


def _opening_json(opening: Opening, window: Window, at: datetime) -> dict[str, Any]:
    return {
        "start": opening.start.astimezone(window.tz).isoformat(),
        "end": opening.end.astimezone(window.tz).isoformat(),
        "start_utc": opening.start.isoformat().replace("+00:00", "Z"),
        "end_utc": opening.end.isoformat().replace("+00:00", "Z"),
        "status": opening.status,
        "current": opening.start <= at < opening.end,
        "frozen_by": list(opening.frozen_by),
        "open_parts": [
            {
                "start_utc": part.start.isoformat().replace("+00:00", "Z"),
                "end_utc": part.end.isoformat().replace("+00:00", "Z"),
            }
            for part in opening.open_parts
        ],
    }


def _answers_json(window: Window, at: datetime, settings: Settings) -> dict[str, Any]:
    """What patchd.windows answers for the window at `at` (the daemon acts on the same)."""
    answer = window_now(window, at, settings.freezes)
    start = answer.next_start
    return {
        "open_now": answer.open,
        "may_start_now": answer.may_start,
        "time_left": format_duration(answer.time_left),
        "next_start_utc": start.isoformat().replace("+00:00", "Z") if start else None,
    }


def window_listing(
    settings: Settings, at: datetime, count: int
) -> list[tuple[Window, list[Opening]]]:
    """Each window with its first `count` openings not ended by `at`."""
    listing: list[tuple[Window, list[Opening]]] = []
    for window in settings.windows.values():
        found: list[Opening] = []
        for opening in openings_from(window, at, settings.freezes):
            found.append(opening)
            if len(found) == count:
                break
        listing.append((window, found))
    return listing


def windows_json(
    settings: Settings, listing: list[tuple[Window, list[Opening]]], at: datetime
) -> dict[str, Any]:
    return {
        "at": at.isoformat().replace("+00:00", "Z"),
        "windows": [
            {
                "name": window.name,
                **_answers_json(window, at, settings),
                "schedule": describe(window),
                "timezone": window.tz.key,
                "duration": format_duration(window.duration),
                "cutoff": format_duration(window.cutoff),
                "openings": [_opening_json(o, window, at) for o in found],
            }
            for window, found in listing
        ],
    }


def render_windows(
    settings: Settings, listing: list[tuple[Window, list[Opening]]], at: datetime
) -> str:
    reasons = {freeze.name: freeze.reason for freeze in settings.freezes}
    lines = [f"at {at:%Y-%m-%d %H:%M:%S}Z"]
    for window, found in listing:
        lines.append(f"\n{window.name}: {describe(window)}")
        if not found:
            lines.append("  (never opens again)")
        for opening in found:
            local = opening.start.astimezone(window.tz)
            marks = []
            if opening.start <= at < opening.end:
                marks.append("now")
            if opening.frozen_by:
                marks.append(f"{opening.status} by {', '.join(opening.frozen_by)}")
                marks.extend(reasons[name] for name in opening.frozen_by if reasons[name])
            lines.append(
                f"  {local:%a %Y-%m-%d %H:%M %Z} ({local:%z})  "
                f"= {opening.start:%Y-%m-%d %H:%M}Z .. {opening.end:%Y-%m-%d %H:%M}Z"
                + (f"  [{'; '.join(marks)}]" if marks else "")
            )
    return "\n".join(lines)
