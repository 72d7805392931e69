"""Pure maintenance-window math: openings, is-open, time left, cutoff and freezes.

The ONLY place that answers "when": the next start, open now, may start and time left.
The daemon's scheduler, `patchd status`, `patchd windows` and the window metrics all
ask here (`window_now` gives the answers for one instant at once), so they cannot disagree.

Nothing here reads the clock: every function takes the instant it reasons about.
All instants going in and out are timezone-aware; results are in UTC.

DST rules (documented in the README):
- a start time that does not exist on a day (spring forward) opens at the first valid
  instant after it, which is the moment of the transition;
- an ambiguous start time (fall back) opens at its first occurrence;
- `duration` is elapsed real time, so a 4h window over a transition still lasts 4 hours.
Two wall-clock starts that resolve to the same instant give one opening.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# How far ahead a schedule is searched before it is declared to never open again.
SEARCH_HORIZON = timedelta(days=366 * 8)


@dataclass(frozen=True)
class Weekly:
    """Opens on the given ISO weekdays (0 = Monday) at a local wall-clock time."""

    days: frozenset[int]
    start: time


@dataclass(frozen=True)
class MonthlyOrdinal:
    """Opens on the n-th weekday of each month (ordinal -1 = last), shifted by offset_days."""

    ordinal: int
    weekday: int
    start: time
    offset_days: int = 0


@dataclass(frozen=True)
class Cron:
    """Opens at each start time of a five-field cron expression, read as local wall clock."""

    expr: str


Schedule = Weekly | MonthlyOrdinal | Cron


@dataclass(frozen=True)
class Window:
    name: str
    schedule: Schedule
    duration: timedelta
    tz: ZoneInfo
    cutoff: timedelta = timedelta(0)


@dataclass(frozen=True)
class Freeze:
    """A span in which nothing may start. Half-open: [start, end)."""

    name: str
    start: datetime
    end: datetime
    reason: str = ""


@dataclass(frozen=True)
class Interval:
    start: datetime
    end: datetime

    def contains(self, at: datetime) -> bool:
        return self.start <= at < self.end


@dataclass(frozen=True)
class Opening:
    """One occurrence of a window: [start, end) in UTC, minus the parts inside freezes."""

    window: str
    start: datetime
    end: datetime
    open_parts: tuple[Interval, ...]
    frozen_by: tuple[str, ...] = field(default=())

    @property
    def status(self) -> Literal["open", "clipped", "frozen"]:
        if not self.open_parts:
            return "frozen"
        if self.frozen_by:
            return "clipped"
        return "open"

    def part_at(self, at: datetime) -> Interval | None:
        for part in self.open_parts:
            if part.contains(at):
                return part
        return None


def _local_date(at: datetime, tz: ZoneInfo) -> date:
    return at.astimezone(tz).date()


def _weekly_starts(schedule: Weekly, first: date) -> Iterator[datetime]:
    day = first
    while True:
        if day.weekday() in schedule.days:
            yield datetime.combine(day, schedule.start)
        day += timedelta(days=1)


def _nth_weekday(year: int, month: int, ordinal: int, weekday: int) -> date | None:
    days = [
        date(year, month, d)
        for d in range(1, calendar.monthrange(year, month)[1] + 1)
        if date(year, month, d).weekday() == weekday
    ]
    if ordinal == -1:
        return days[-1]
    return days[ordinal - 1] if ordinal <= len(days) else None


def _monthly_starts(schedule: MonthlyOrdinal, first: date) -> Iterator[datetime]:
    # Begin a month early: a positive offset can carry last month's date into this one.
    year, month = (first.year, first.month - 1) if first.month > 1 else (first.year - 1, 12)
    while True:
        base = _nth_weekday(year, month, schedule.ordinal, schedule.weekday)
        if base is not None:
            day = base + timedelta(days=schedule.offset_days)
            if day >= first:
                yield datetime.combine(day, schedule.start)
        year, month = (year, month + 1) if month < 12 else (year + 1, 1)


def _cron_starts(schedule: Cron, first: date) -> Iterator[datetime]:
    # Naive datetimes make croniter walk the wall clock with no DST arithmetic of its own.
    itr = croniter(schedule.expr, datetime.combine(first, time()) - timedelta(minutes=1))
    try:
        while True:
            yield itr.get_next(datetime)
    except CroniterBadDateError:
        return


def wall_starts(schedule: Schedule, first: date) -> Iterator[datetime]:
    """Naive local wall-clock start times on or after midnight of `first`, increasing."""
    if isinstance(schedule, Weekly):
        return _weekly_starts(schedule, first)
    if isinstance(schedule, MonthlyOrdinal):
        return _monthly_starts(schedule, first)
    return _cron_starts(schedule, first)


def resolve_wall_time(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant at which a naive local wall-clock time happens, by the DST rules."""
    first = wall.replace(tzinfo=tz, fold=0)
    utc = first.astimezone(UTC)
    if utc.astimezone(tz).replace(tzinfo=None) == wall:
        return utc  # exists; fold=0 is the first occurrence when ambiguous
    # In a gap: find the transition, the first instant whose local time is past `wall`.
    low = int(wall.replace(tzinfo=tz, fold=1).astimezone(UTC).timestamp())
    high = int(utc.timestamp())
    if low > high:
        low, high = high, low
    while low < high:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, tz).replace(tzinfo=None) > wall:
            high = mid
        else:
            low = mid + 1
    return datetime.fromtimestamp(low, UTC)


def _subtract_freezes(
    start: datetime, end: datetime, freezes: Iterable[Freeze]
) -> tuple[tuple[Interval, ...], tuple[str, ...]]:
    parts = [Interval(start, end)]
    names: list[str] = []
    for freeze in sorted(freezes, key=lambda f: f.start):
        if freeze.end <= start or freeze.start >= end:
            continue
        names.append(freeze.name)
        remaining: list[Interval] = []
        for part in parts:
            if part.start < freeze.start:
                remaining.append(Interval(part.start, min(part.end, freeze.start)))
            if part.end > freeze.end:
                remaining.append(Interval(max(part.start, freeze.end), part.end))
        parts = remaining
    return tuple(parts), tuple(names)


def openings_from(
    window: Window, at: datetime, freezes: Iterable[Freeze] = ()
) -> Iterator[Opening]:
    """Every opening that has not ended by `at` (the current one first), in start order.

    The iterator ends only when the schedule has no start within SEARCH_HORIZON.
    """
    freezes = tuple(freezes)
    # A window that opened up to `duration` ago may still be open; one extra day covers
    # the widest UTC offset difference between the local date and the instant.
    first_day = _local_date(at - window.duration, window.tz) - timedelta(days=1)
    horizon = at + SEARCH_HORIZON
    previous: datetime | None = None
    for wall in wall_starts(window.schedule, first_day):
        start = resolve_wall_time(wall, window.tz)
        if start > horizon:
            return
        if previous is not None and start <= previous:
            continue
        previous = start
        end = start + window.duration
        if end <= at:
            continue
        parts, names = _subtract_freezes(start, end, freezes)
        yield Opening(window.name, start, end, parts, names)


def next_openings(
    window: Window, after: datetime, count: int, freezes: Iterable[Freeze] = ()
) -> list[Opening]:
    """The first `count` openings that start strictly after `after`."""
    result: list[Opening] = []
    for opening in openings_from(window, after, freezes):
        if opening.start > after:
            result.append(opening)
            if len(result) == count:
                break
    return result


def current_opening(window: Window, at: datetime, freezes: Iterable[Freeze] = ()) -> Opening | None:
    """The opening whose span holds `at` (the one ending last if several overlap)."""
    found: Opening | None = None
    for opening in openings_from(window, at, freezes):
        if opening.start > at:
            break
        if found is None or opening.end > found.end:
            found = opening
    return found


def open_part_at(window: Window, at: datetime, freezes: Iterable[Freeze] = ()) -> Interval | None:
    """The unfrozen part of an opening that holds `at`, or None when the window is shut."""
    best: Interval | None = None
    for opening in openings_from(window, at, freezes):
        if opening.start > at:
            break
        part = opening.part_at(at)
        if part is not None and (best is None or part.end > best.end):
            best = part
    return best


def is_open(window: Window, at: datetime, freezes: Iterable[Freeze] = ()) -> bool:
    return open_part_at(window, at, freezes) is not None


def time_left(window: Window, at: datetime, freezes: Iterable[Freeze] = ()) -> timedelta:
    """Time until the open part holding `at` closes (a freeze closes it early); 0 if shut."""
    part = open_part_at(window, at, freezes)
    return part.end - at if part is not None else timedelta(0)


def may_start(window: Window, at: datetime, freezes: Iterable[Freeze] = ()) -> bool:
    """Whether a new target may start at `at`: open, unfrozen, and before the cutoff.

    The cutoff counts back from the end of the open part, so a freeze that clips a window
    moves its cutoff earlier too.
    """
    return _allows_start(window, open_part_at(window, at, freezes), at)


def _allows_start(window: Window, part: Interval | None, at: datetime) -> bool:
    return part is not None and at < part.end - window.cutoff


def in_freeze(at: datetime, freezes: Iterable[Freeze]) -> Freeze | None:
    for freeze in freezes:
        if freeze.start <= at < freeze.end:
            return freeze
    return None


def next_start(window: Window, freezes: Iterable[Freeze], after: datetime) -> datetime | None:
    """The first instant after `after` at which the window starts allowing starts (an
    unfrozen part begins that is longer than the cutoff); None if it never does again."""
    for opening in openings_from(window, after, freezes):
        for part in opening.open_parts:
            if after < part.start < part.end - window.cutoff:
                return part.start
    return None


@dataclass(frozen=True)
class WindowNow:
    """What a window says at one instant: what every front door shows about it."""

    open: bool  # an unfrozen part of an opening holds the instant
    may_start: bool  # open and before the cutoff: a new target may start
    time_left: timedelta  # until the open part closes; 0 when shut
    next_start: datetime | None  # the first later instant at which starts are allowed


def window_now(window: Window, at: datetime, freezes: Iterable[Freeze] = ()) -> WindowNow:
    freezes = tuple(freezes)
    part = open_part_at(window, at, freezes)
    return WindowNow(
        open=part is not None,
        may_start=_allows_start(window, part, at),
        time_left=part.end - at if part is not None else timedelta(0),
        next_start=next_start(window, freezes, at),
    )
