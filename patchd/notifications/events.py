"""The event model: what patchd tells people, as values with a readable subject and body
and a JSON document.

Each builder is pure (times and results come in as parameters). An `Event` carries its
kind, the group, a plain-text subject and body (for mail and chat) and `data`, the
machine-readable detail; `document()` is what a webhook receives and what the outbox
journals. The control socket builds approval, quarantine and pause events with the
builders here and hands them to `Runtime.notify`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from patchd import versions
from patchd.config.notifications import EventKind
from patchd.durations import format_duration
from patchd.engine.rollout import RunResult
from patchd.engine.target import TargetOutcome
from patchd.states import FAILED_RESULTS, TargetResult

__all__ = [
    "Event",
    "EventKind",
    "approval_needed",
    "halted",
    "paused",
    "quarantined",
    "resumed",
    "rollback",
    "rollback_retried",
    "rolled_back_at_restart",
    "run_finished",
]

_COUNTED = tuple(TargetResult)  # every result, in the order the summary names them
_WORDS = {
    "success": "patched",
    "rolled_back": "rolled back",
    "rollback_failed": "rollback failed",
    "out_of_service": "left out of service",
    "failed": "failed",
    "current": "up to date",
    "skipped": "skipped",
    "pending": "pending",
}


@dataclass(frozen=True)
class Event:
    kind: EventKind
    at: datetime
    subject: str
    text: str
    group: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The JSON document of this event (the webhook's body)."""
        return {
            "event": self.kind.value,
            "at": self.at.astimezone(UTC).isoformat(),
            "group": self.group,
            "subject": self.subject,
            "text": self.text,
            "data": dict(self.data),
        }


def _seconds(value: timedelta) -> str:
    whole = int(value.total_seconds())
    return format_duration(timedelta(seconds=whole)) if whole else f"{value.total_seconds():.1f}s"


def _version(outcome: TargetOutcome) -> dict[str, Any]:
    update = outcome.update
    return {
        "target": outcome.target.name,
        "ref": update.ref if update else None,
        "from": versions.name(update.ref, update.current) if update else None,
        "to": versions.name(update.ref, update.available) if update else None,
        "result": outcome.result.value,
    }


def run_finished(
    result: RunResult, window: str | None, started: datetime, finished: datetime
) -> Event:
    """A run's summary: group, window, counts, failed targets with reasons, versions,
    duration."""
    counts = {name.value: result.count(name) for name in _COUNTED}
    failed = [
        {"target": o.target.name, "result": o.result.value, "error": o.error or ""}
        for o in result.outcomes
        if o.result in FAILED_RESULTS
    ]
    versions = [
        _version(o)
        for o in result.outcomes
        if o.update is not None
        and o.result not in (TargetResult.CURRENT, TargetResult.PENDING, TargetResult.SKIPPED)
    ]
    duration = finished - started
    shown = [
        f"{counts[k]} {_WORDS[k]}"
        for k in (r.value for r in _COUNTED)
        if counts[k] or k == "success"
    ]
    subject = f"patchd: {result.group} {result.status.value}: " + ", ".join(shown)
    lines = [
        f"Group {result.group}, window {window or '-'}: run {result.run_id}"
        f" {result.status.value} in {_seconds(duration)}.",
        ", ".join(f"{_WORDS[k].capitalize() if i == 0 else _WORDS[k]} {counts[k]}"
                  for i, k in enumerate(_COUNTED)) + ".",
    ]  # fmt: skip
    if result.error:
        lines.append(f"Error: {result.error}")
    if failed:
        lines += ["", "Failed targets:"]
        lines += [f"  {f['target']}: {f['result']}: {f['error'] or 'no reason given'}"
                  for f in failed]  # fmt: skip
    if versions:
        lines += ["", "Versions:"]
        lines += [f"  {v['target']}: {v['ref']} {v['from'] or '-'} -> {v['to']} ({v['result']})"
                  for v in versions]  # fmt: skip
    return Event(
        EventKind.RUN_FINISHED,
        finished,
        subject,
        "\n".join(lines) + "\n",
        result.group,
        {
            "run_id": result.run_id,
            "status": result.status.value,
            "window": window,
            "started": started.astimezone(UTC).isoformat(),
            "duration_seconds": round(duration.total_seconds(), 3),
            "counts": counts,
            "failed_targets": failed,
            "versions": versions,
            "error": result.error,
        },
    )


def halted(result: RunResult, window: str | None, at: datetime) -> Event:
    """A run stopped starting targets because its error budget was spent."""
    names = ", ".join(o.target.name for o in result.outcomes if o.result in FAILED_RESULTS)
    pending = result.count(TargetResult.PENDING)
    return Event(
        EventKind.HALTED,
        at,
        f"patchd: {result.group} halted after {result.failed} failed target(s)",
        f"Run {result.run_id} of group {result.group} (window {window or '-'}) spent its"
        f" error budget and started no more targets.\nFailed: {names or '-'}.\n"
        f"Left for the next window: {pending} target(s).\n",
        result.group,
        {"run_id": result.run_id, "window": window, "failed": result.failed, "pending": pending},
    )


def rollback(run_id: str, group: str, outcome: TargetOutcome, at: datetime) -> Event:
    """A target was rolled back (ROLLBACK) or its rollback failed (ROLLBACK_FAILED)."""
    failed = outcome.result == TargetResult.ROLLBACK_FAILED
    version = _version(outcome)
    reason = outcome.error or "no reason given"
    if failed:
        subject = f"patchd: ROLLBACK FAILED on {outcome.target.name} ({group}): needs a person"
        text = (
            f"Target {outcome.target.name} of group {group} failed and could not be rolled"
            f" back (run {run_id}).\nCause: {reason}\nIt is left as it is: a person must look"
            " at it (patchd status shows it).\n"
        )
    else:
        subject = f"patchd: {outcome.target.name} ({group}) rolled back"
        text = (
            f"Target {outcome.target.name} of group {group} was rolled back to"
            f" {version['from'] or 'its snapshot'} (run {run_id}).\nCause: {reason}\n"
        )
    return Event(
        EventKind.ROLLBACK_FAILED if failed else EventKind.ROLLBACK,
        at,
        subject,
        text,
        group,
        {"run_id": run_id, "error": outcome.error, **version},
    )


def rolled_back_at_restart(
    run_id: str, group: str | None, target: str, was: str, failed: str | None, at: datetime
) -> Event:
    """A target a stopped patchd left mid-patch (in state `was`) was rolled back when
    patchd started again, or that rollback failed (`failed` holds why)."""
    where = f"group {group}" if group else "a group no longer configured"
    if failed is not None:
        subject = f"patchd: ROLLBACK FAILED on {target} ({group or '-'}) at restart: needs a person"
        text = (
            f"Target {target} of {where} was left {was} by a patchd that stopped (run"
            f" {run_id}); rolling it back at restart failed.\nCause: {failed}\nIt is left"
            " as it is: a person must look at it (patchd status shows it).\n"
        )
    else:
        subject = f"patchd: {target} ({group or '-'}) rolled back at restart"
        text = (
            f"Target {target} of {where} was left {was} by a patchd that stopped (run"
            f" {run_id}); it was rolled back when patchd started again.\n"
        )
    return Event(
        EventKind.ROLLBACK_FAILED if failed is not None else EventKind.ROLLBACK,
        at,
        subject,
        text,
        group,
        {"run_id": run_id, "target": target, "was": was, "error": failed, "at_restart": True},
    )


def rollback_retried(
    run_id: str, group: str, target: str, attempt: int, failed: str | None, at: datetime
) -> Event:
    """A target whose rollback had failed was rolled back by a later retry (`attempt`),
    or the last retry failed too (`failed` holds why): patchd tries no more."""
    if failed is not None:
        subject = f"patchd: ROLLBACK FAILED on {target} ({group}) after {attempt} retries"
        text = (
            f"Target {target} of group {group} (run {run_id}) could not be rolled back, and"
            f" {attempt} retries failed too; patchd tries no more.\nCause: {failed}\nIt is"
            " left as it is: a person must look at it (patchd status shows it).\n"
        )
    else:
        subject = f"patchd: {target} ({group}) rolled back on retry {attempt}"
        text = (
            f"Target {target} of group {group} (run {run_id}), whose rollback had failed,"
            f" was rolled back by retry {attempt}: nobody needs to put it back by hand.\n"
        )
    return Event(
        EventKind.ROLLBACK_FAILED if failed is not None else EventKind.ROLLBACK,
        at,
        subject,
        text,
        group,
        {"run_id": run_id, "target": target, "retry": attempt, "error": failed},
    )


def approval_needed(group: str, versions: Mapping[str, str], reason: str, at: datetime) -> Event:
    """A stage with `approval = "manual"` waits for `patchd approve GROUP`."""
    listed = "".join(f"  {ref}: {version}\n" for ref, version in sorted(versions.items()))
    listed = listed or "  (none)\n"
    return Event(
        EventKind.APPROVAL_NEEDED,
        at,
        f"patchd: {group} awaits approval",
        f"Group {group} waits for an approval: {reason}\n"
        f"Approving pins these versions:\n{listed}"
        f"Run `patchd approve {group}` to release it.\n",
        group,
        {"versions": dict(versions), "reason": reason},
    )


def quarantined(group: str, version: str, target: str, reason: str, at: datetime) -> Event:
    """A version failed verification and is not installed again in the group."""
    return Event(
        EventKind.QUARANTINED,
        at,
        f"patchd: {version} quarantined in {group}",
        f"Version {version} failed on {target} (group {group}): {reason}\nIt will not be"
        " installed again in this group until a newer version appears or an operator runs"
        f" `patchd quarantine clear {group}`.\n",
        group,
        {"version": version, "target": target, "reason": reason},
    )


def _groups(groups: Iterable[str] | None) -> tuple[list[str] | None, str]:
    if groups is None:
        return None, "all groups"
    names = sorted(groups)
    return names, ("group " if len(names) == 1 else "groups ") + ", ".join(names)


def paused(
    groups: Iterable[str] | None,
    who: str,
    at: datetime,
    reason: str = "",
    until: datetime | None = None,
) -> Event:
    """An operator paused groups (None: all of them); `who` names the user (and pid)."""
    names, shown = _groups(groups)
    ends = f" until {until.astimezone(UTC):%Y-%m-%d %H:%M}Z" if until else " until resumed"
    return Event(
        EventKind.PAUSED,
        at,
        f"patchd: {shown} paused by {who}",
        f"{shown.capitalize()} paused by {who}{ends}: no new target starts, targets in"
        f" flight finish.\nReason: {reason or 'none given'}\n",
        names[0] if names and len(names) == 1 else None,
        {
            "groups": names,
            "who": who,
            "reason": reason,
            "until": until.astimezone(UTC).isoformat() if until else None,
        },
    )


def resumed(groups: Iterable[str] | None, who: str, at: datetime) -> Event:
    """An operator resumed paused groups (None: all)."""
    names, shown = _groups(groups)
    return Event(
        EventKind.RESUMED,
        at,
        f"patchd: {shown} resumed by {who}",
        f"{shown.capitalize()} resumed by {who}: targets start again inside their windows.\n",
        names[0] if names and len(names) == 1 else None,
        {"groups": names, "who": who},
    )
