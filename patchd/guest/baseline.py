"""A baseline's decision on pending package updates: which are eligible now, which are
held back and why (excluded, not included, not security, approve_after until when).

Pure: the pending list, the instants patchd first saw each candidate version and the
current instant are parameters, so it is tested without a machine and without sleeping.
Where first-seen instants are kept (the state store) is the caller's business; this
module only says which keys it needs (`seen_key`) and what it makes of them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from patchd.config.baselines import BaselineModel
from patchd.durations import format_duration
from patchd.guest.packages import Pending

# Held-back reasons, as compliance reports count them.
EXCLUDED = "excluded"
NOT_INCLUDED = "not included"
NOT_SECURITY = "not security"
NOT_YET = "approve_after"


def seen_key(package: str, version: str) -> str:
    """How a candidate version is named in the first-seen journal."""
    return f"{package}={version}"


class FirstSeen(Protocol):
    """The journal of when patchd first saw each candidate version."""

    def first_seen(self, keys: Iterable[str], now: datetime) -> Mapping[str, datetime]:
        """The first-seen instant of every key; a key never seen before is first seen
        `now` (and recorded, where the journal can write)."""


class NoJournal:
    """First seen always now, recorded nowhere: for callers without a baseline that
    uses approve_after, where the instant does not matter."""

    def first_seen(self, keys: Iterable[str], now: datetime) -> Mapping[str, datetime]:
        return dict.fromkeys(keys, now)


@dataclass(frozen=True)
class Held:
    """A pending update the baseline does not install now."""

    update: Pending
    kind: str  # EXCLUDED, NOT_INCLUDED, NOT_SECURITY or NOT_YET
    reason: str  # in words, with the glob or the date
    until: datetime | None = None  # NOT_YET: when it becomes eligible

    def as_dict(self) -> dict[str, object]:
        return {
            "package": self.update.package,
            "installed": self.update.installed,
            "candidate": self.update.candidate,
            "security": self.update.security,
            "held": self.kind,
            "reason": self.reason,
            "until": None if self.until is None else _iso(self.until),
        }


@dataclass(frozen=True)
class Decision:
    """What a baseline makes of a pending list at one instant."""

    eligible: tuple[Pending, ...]
    held: tuple[Held, ...]
    # First-seen instant of every pending candidate (eligible and held).
    seen: Mapping[str, datetime]

    def oldest_security(self) -> datetime | None:
        """When patchd first saw the oldest security update still pending (eligible or
        held), or None when none is pending."""
        instants = [
            self.seen[seen_key(p.package, p.candidate)]
            for p in (*self.eligible, *(h.update for h in self.held))
            if p.security and seen_key(p.package, p.candidate) in self.seen
        ]
        return min(instants) if instants else None


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _match(package: str, globs: Sequence[str]) -> str | None:
    return next((g for g in globs if fnmatch.fnmatchcase(package, g)), None)


def hold_reason(
    baseline: BaselineModel, update: Pending, first_seen: datetime, now: datetime
) -> Held | None:
    """Why `baseline` holds `update` back at `now`, or None when it is eligible. The first
    rule that holds it back is the reason given."""
    glob = _match(update.package, baseline.exclude)
    if glob is not None:
        return Held(update, EXCLUDED, f"excluded by the baseline ({glob})")
    if baseline.include and _match(update.package, baseline.include) is None:
        globs = ", ".join(baseline.include)
        return Held(update, NOT_INCLUDED, f"not among the baseline's include ({globs})")
    if baseline.security_only and not update.security:
        return Held(update, NOT_SECURITY, f"not a security update ({update.source or 'unknown'})")
    eligible_at = first_seen + baseline.approve_after
    if now < eligible_at:
        return Held(
            update,
            NOT_YET,
            f"approve_after {format_duration(baseline.approve_after)}: first seen"
            f" {_iso(first_seen)}, eligible at {_iso(eligible_at)}",
            until=eligible_at,
        )
    return None


def decide(
    baseline: BaselineModel | None,
    pending: Sequence[Pending],
    journal: FirstSeen,
    now: datetime,
) -> Decision:
    """Split `pending` into what may be installed now and what is held back. Without a
    baseline everything is eligible. Every candidate's first sighting is journaled, even
    one held back for another reason, so that approve_after counts from the day it
    appeared, not from the day an exclude was lifted."""
    seen = journal.first_seen([seen_key(p.package, p.candidate) for p in pending], now)
    if baseline is None:
        return Decision(tuple(pending), (), seen)
    eligible: list[Pending] = []
    held: list[Held] = []
    for update in pending:
        first = seen.get(seen_key(update.package, update.candidate), now)
        reason = hold_reason(baseline, update, first, now)
        if reason is None:
            eligible.append(update)
        else:
            held.append(reason)
    return Decision(tuple(eligible), tuple(held), seen)


def reboot_wanted(baseline: BaselineModel | None, required: str | None, forced: bool) -> str | None:
    """Why to reboot after an install, or None. `required`: the machine's own reason
    (reboot-required); `forced`: the group's patch.reboot."""
    policy = baseline.reboot if baseline is not None else "if-required"
    if policy == "never":
        return None
    if policy == "always":
        return required or 'the baseline\'s reboot = "always"'
    return required or ("patch.reboot = true" if forced else None)
