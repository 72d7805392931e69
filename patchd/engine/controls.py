"""What operators decided, as values: pauses, approvals and quarantined versions.

The store keeps each as a plain keyed JSON control (state.base.ControlRow); this module
is the one room that gives them meaning, so the runner, the engine, the control socket,
reports and metrics read them the same way:

- a Pause holds new starts of a group until it is resumed or its `until` passes (an
  expired pause is no pause; nothing needs to delete it for that);
- an Approval releases a group with `approval = "manual"` to exactly the versions its
  earlier stage had verified when the operator approved;
- a Quarantine is a version (Update.available of a ref) that failed its verification
  on a target of a group: it is installed nowhere in the group, nor in a later stage,
  until an operator clears it (a newer version is another key, so it goes through).
  Once a newer version of the same ref passes on a target of the group, the quarantine
  is superseded: still kept (and still never installed), but no longer an open matter
  (the gauge `patchd_quarantined_versions` counts only the open ones).

Pure logic: the clock's instant is a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from patchd import versions
from patchd.state.base import ControlRow, Store

PAUSE = "pause"
APPROVAL = "approval"
QUARANTINE = "quarantine"


def _zulu(at: datetime) -> str:
    return f"{at:%Y-%m-%d %H:%M:%S}Z"


def _time(text: Any) -> datetime | None:
    return None if text is None else datetime.fromisoformat(str(text))


@dataclass(frozen=True)
class Pause:
    group: str
    since: datetime
    until: datetime | None  # None: until resumed
    reason: str
    by: str

    def active(self, now: datetime) -> bool:
        return self.until is None or now < self.until

    def describe(self) -> str:
        until = f" until {_zulu(self.until)}" if self.until else " until resumed"
        why = f": {self.reason}" if self.reason else ""
        return f"paused by {self.by} since {_zulu(self.since)}{until}{why}"

    def data(self) -> dict[str, Any]:
        return {
            "until": None if self.until is None else self.until.isoformat(),
            "reason": self.reason,
            "by": self.by,
        }

    @classmethod
    def from_row(cls, row: ControlRow) -> Pause:
        d = row.data
        return cls(row.group, row.at, _time(d.get("until")), str(d.get("reason", "")), str(d["by"]))


def pauses(store: Store, now: datetime) -> dict[str, Pause]:
    """group -> its pause in force at `now` (expired ones are left out)."""
    found = (Pause.from_row(row) for row in store.controls(PAUSE))
    return {p.group: p for p in found if p.active(now)}


def pause_of(store: Store, group: str, now: datetime) -> Pause | None:
    for row in store.controls(PAUSE, group):
        pause = Pause.from_row(row)
        if pause.active(now):
            return pause
    return None


@dataclass(frozen=True)
class Approval:
    group: str
    at: datetime
    by: str
    pins: Mapping[str, str]  # ref -> version, exactly what the earlier stage had verified

    def describe(self) -> str:
        pinned = ", ".join(versions.of(ref, v) for ref, v in sorted(self.pins.items()))
        return f"approved by {self.by} at {_zulu(self.at)} ({pinned or 'no versions'})"

    @classmethod
    def from_row(cls, row: ControlRow) -> Approval:
        return cls(row.group, row.at, str(row.data["by"]), dict(row.data.get("pins", {})))


def approval_of(store: Store, group: str) -> Approval | None:
    rows = store.controls(APPROVAL, group)
    return Approval.from_row(rows[-1]) if rows else None


def approve(store: Store, group: str, pins: Mapping[str, str], by: str, at: datetime) -> Approval:
    store.put_control(APPROVAL, group, "", {"by": by, "pins": dict(pins)}, at)
    return Approval(group, at, by, dict(pins))


@dataclass(frozen=True)
class Quarantine:
    group: str
    ref: str
    version: str
    since: datetime
    target: str
    reason: str
    superseded_by: str | None = None  # the newer version that passed since

    @property
    def key(self) -> str:
        return quarantine_key(self.ref, self.version)

    def describe(self) -> str:
        newer = (
            f"; superseded by {versions.name(self.ref, self.superseded_by)}"
            if self.superseded_by
            else ""
        )
        return (
            f"{versions.of(self.ref, self.version)} quarantined since {_zulu(self.since)}"
            f" (failed on {self.target}: {self.reason}{newer})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "ref": self.ref,
            "version": self.version,
            "since": self.since.isoformat(),
            "target": self.target,
            "reason": self.reason,
            "superseded_by": self.superseded_by,
        }

    @classmethod
    def from_row(cls, row: ControlRow) -> Quarantine:
        d = row.data
        newer = d.get("superseded_by")
        return cls(row.group, str(d["ref"]), str(d["version"]), row.at, str(d["target"]),
                   str(d.get("reason", "")), None if newer is None else str(newer))  # fmt: skip


def quarantine_key(ref: str, version: str) -> str:
    return f"{ref}@{version}"


def quarantined(store: Store, groups: Iterable[str | None]) -> dict[tuple[str, str], Quarantine]:
    """(ref, version) -> its quarantine in any of `groups` (a group and its earlier
    stages: a later stage never receives what failed before it)."""
    found: dict[tuple[str, str], Quarantine] = {}
    for group in groups:
        if group is None:
            continue
        for row in store.controls(QUARANTINE, group):
            q = Quarantine.from_row(row)
            found.setdefault((q.ref, q.version), q)
    return found


def open_quarantines(store: Store, group: str) -> list[Quarantine]:
    """The group's quarantined versions that no newer version has superseded yet."""
    found = (Quarantine.from_row(row) for row in store.controls(QUARANTINE, group))
    return [q for q in found if q.superseded_by is None]


def quarantine(store: Store, q: Quarantine) -> None:
    data = {"ref": q.ref, "version": q.version, "target": q.target, "reason": q.reason}
    if q.superseded_by is not None:
        data["superseded_by"] = q.superseded_by
    store.put_control(QUARANTINE, q.group, q.key, data, q.since)


def supersede(store: Store, group: str, ref: str, version: str) -> int:
    """`version` of `ref` passed on a target of `group`: the group's open quarantines
    of other versions of that ref are superseded (kept, still not installed, no longer
    counted as open). Returns how many."""
    count = 0
    for q in open_quarantines(store, group):
        if q.ref == ref and q.version != version:
            quarantine(store, replace(q, superseded_by=version))
            count += 1
    return count


def clear_quarantine(store: Store, group: str, version: str | None = None) -> int:
    """Clear a group's quarantined versions (those whose version or `ref@version` is
    `version`, or all); returns how many."""
    if version is None:
        return store.drop_control(QUARANTINE, group)
    count = 0
    for row in store.controls(QUARANTINE, group):
        q = Quarantine.from_row(row)
        if version in (q.version, q.key) or (len(version) >= 12 and q.version.startswith(version)):
            count += store.drop_control(QUARANTINE, group, q.key)
    return count


def quarantine_listing(store: Store, groups: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """group -> its quarantined versions, as `patchd quarantine list` and the control
    socket show them (each with its `describe` line)."""
    return {
        g: [q.as_dict() | {"describe": q.describe()} for q in quarantined(store, [g]).values()]
        for g in groups
    }
