"""The journal of package-patching backends, as values in the state store: when patchd
first saw each candidate version (approve_after counts from it), and each target's last
compliance check (what `patchd compliance` and the metrics show).

Both are plain keyed JSON controls (state.base.ControlRow), like pauses and quarantines,
so SQLite and PostgreSQL keep them without a schema change; this module is the one room
that gives them meaning. Pure logic: the instant is a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from patchd.backends.base import Backend, Target
from patchd.config.settings import Group
from patchd.guest.assessment import AssessesPackages, Assessment
from patchd.state.base import Store, StoreError

FIRST_SEEN = "first_seen"
COMPLIANCE = "compliance"
_EVERY_GROUP = ""  # a version is first seen by patchd, whichever group saw it


class StoreFirstSeen:
    """First sightings kept in the store. `record=False` (a read-only store, `patchd
    plan`): an unseen version is first seen `now` but not written."""

    def __init__(self, store: Store, record: bool = True) -> None:
        self.store = store
        self.record = record
        self.unrecorded: str | None = None  # why a sighting could not be written

    def first_seen(self, keys: Iterable[str], now: datetime) -> Mapping[str, datetime]:
        known = {row.key: row.at for row in self.store.controls(FIRST_SEEN, _EVERY_GROUP)}
        found: dict[str, datetime] = {}
        for key in keys:
            if key not in known and self.record:
                # Two processes seeing one version at once both write: the later instant
                # wins, seconds apart, which approve_after's days do not notice.
                try:
                    self.store.put_control(FIRST_SEEN, _EVERY_GROUP, key, {}, now)
                except StoreError as err:
                    # Safe to go on: an unrecorded version is first seen again later,
                    # so approve_after holds it longer, never shorter.
                    self.unrecorded = str(err)
            found[key] = known.get(key, now)
        return found


def assess(
    backend: Backend,
    target: Target,
    pins: Mapping[str, str],
    group: Group,
    journal: StoreFirstSeen,
    now: datetime,
) -> Assessment | None:
    """The backend's assessment of `target` under the group's baseline, or None when the
    backend does not patch the target's packages (a site script, an image: its
    check_update says what is pending)."""
    if not isinstance(backend, AssessesPackages):
        return None
    return backend.assess(target, pins, group.patch, group.baseline, journal, now)


def held_summary(assessment: Assessment, group: Group) -> str:
    """Why a target with pending updates gets none: what its baseline holds back."""
    held = assessment.decision.held
    shown = "; ".join(f"{h.update.package} {h.update.candidate}: {h.reason}" for h in held[:5])
    more = f"; and {len(held) - 5} more" if len(held) > 5 else ""
    return f"baseline {group.baseline_name!r} holds back {len(held)} update(s): {shown}{more}"


@dataclass(frozen=True)
class Compliance:
    """A target's last compliance check, as the store keeps it."""

    group: str
    target: str
    checked: datetime
    doc: Mapping[str, Any]  # patchd.compliance's per-target document


def record_compliance(
    store: Store, group: str, target: str, doc: Mapping[str, Any], at: datetime
) -> None:
    store.put_control(COMPLIANCE, group, target, doc, at)


def compliance(store: Store, group: str | None = None) -> list[Compliance]:
    return [
        Compliance(row.group, row.key, row.at, row.data)
        for row in store.controls(COMPLIANCE, group)
    ]
