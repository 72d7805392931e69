"""Window math: table tests in real zones around DST changes, and property tests."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchd.windows import (
    Cron,
    Freeze,
    MonthlyOrdinal,
    Schedule,
    Weekly,
    Window,
    current_opening,
    is_open,
    may_start,
    next_openings,
    openings_from,
    resolve_wall_time,
    time_left,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
KOLKATA = ZoneInfo("Asia/Kolkata")
MON, TUE, WED, THU, FRI, SAT, SUN = range(7)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def window(schedule: Schedule, tz: ZoneInfo, hours: float = 2, cutoff_minutes: int = 0) -> Window:
    return Window("w", schedule, timedelta(hours=hours), tz, timedelta(minutes=cutoff_minutes))


def first_start(w: Window, after: datetime) -> datetime:
    return next_openings(w, after, 1)[0].start


# --- DST table tests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "wall", "expected"),
    [
        # Berlin spring forward 2026-03-29 02:00 CET -> 03:00 CEST (01:00Z).
        (BERLIN, datetime(2026, 3, 29, 2, 0), utc(2026, 3, 29, 1, 0)),
        (BERLIN, datetime(2026, 3, 29, 2, 30), utc(2026, 3, 29, 1, 0)),
        (BERLIN, datetime(2026, 3, 29, 3, 0), utc(2026, 3, 29, 1, 0)),
        (BERLIN, datetime(2026, 3, 29, 1, 59), utc(2026, 3, 29, 0, 59)),
        # Berlin fall back 2026-10-25 03:00 CEST -> 02:00 CET: first occurrence is CEST.
        (BERLIN, datetime(2026, 10, 25, 2, 30), utc(2026, 10, 25, 0, 30)),
        (BERLIN, datetime(2026, 10, 25, 3, 0), utc(2026, 10, 25, 2, 0)),
        # New York spring forward 2026-03-08 02:00 EST -> 03:00 EDT (07:00Z).
        (NEW_YORK, datetime(2026, 3, 8, 2, 30), utc(2026, 3, 8, 7, 0)),
        # New York fall back 2026-11-01 02:00 EDT -> 01:00 EST: 01:30 first as EDT.
        (NEW_YORK, datetime(2026, 11, 1, 1, 30), utc(2026, 11, 1, 5, 30)),
        # Lord Howe: +10:30 -> +11:00 at 02:00 on 2026-10-04 (15:30Z the day before).
        (LORD_HOWE, datetime(2026, 10, 4, 2, 0), utc(2026, 10, 3, 15, 30)),
        (LORD_HOWE, datetime(2026, 10, 4, 2, 15), utc(2026, 10, 3, 15, 30)),
        (LORD_HOWE, datetime(2026, 10, 4, 2, 30), utc(2026, 10, 3, 15, 30)),
        (LORD_HOWE, datetime(2026, 10, 4, 2, 31), utc(2026, 10, 3, 15, 31)),
        # Lord Howe: +11:00 -> +10:30 at 02:00 on 2026-04-05; 01:45 happens twice.
        (LORD_HOWE, datetime(2026, 4, 5, 1, 45), utc(2026, 4, 4, 14, 45)),
        (LORD_HOWE, datetime(2026, 4, 5, 2, 0), utc(2026, 4, 4, 15, 30)),
        # Kolkata has no DST.
        (KOLKATA, datetime(2026, 3, 29, 2, 30), utc(2026, 3, 28, 21, 0)),
    ],
)
def test_resolve_wall_time(tz: ZoneInfo, wall: datetime, expected: datetime) -> None:
    assert resolve_wall_time(wall, tz) == expected


def test_weekly_start_in_spring_gap_opens_at_transition_and_lasts_elapsed_time() -> None:
    w = window(Weekly(frozenset({SUN}), time(2, 30)), BERLIN, hours=2)
    [opening] = next_openings(w, utc(2026, 3, 28, 12), 1)
    assert opening.start == utc(2026, 3, 29, 1, 0)  # 03:00 CEST
    assert opening.end == utc(2026, 3, 29, 3, 0)  # 05:00 CEST: two real hours
    # The week before and after are at 02:30 local as usual.
    assert first_start(w, utc(2026, 3, 21)) == utc(2026, 3, 22, 1, 30)
    assert first_start(w, utc(2026, 3, 30)) == utc(2026, 4, 5, 0, 30)


def test_weekly_ambiguous_start_opens_once_at_first_occurrence() -> None:
    w = window(Weekly(frozenset({SUN}), time(2, 30)), BERLIN, hours=2)
    first, second = next_openings(w, utc(2026, 10, 24), 2)
    assert first.start == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    assert first.end == utc(2026, 10, 25, 2, 30)  # 03:30 CET, two real hours
    assert second.start == utc(2026, 11, 1, 1, 30)  # 02:30 CET a week later


def test_cron_new_york_around_spring_forward() -> None:
    w = window(Cron("30 2 * * *"), NEW_YORK, hours=1)
    starts = [o.start for o in next_openings(w, utc(2026, 3, 7), 3)]
    assert starts == [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]


def test_cron_every_half_hour_through_the_gap_gives_no_duplicate_openings() -> None:
    w = window(Cron("*/30 1-4 * * *"), BERLIN, hours=0.25)
    starts = [o.start for o in next_openings(w, utc(2026, 3, 28, 23), 6)]
    # 01:00, 01:30 CET; 02:00 and 02:30 fall in the gap and merge into 03:00 CEST.
    assert starts == [
        utc(2026, 3, 29, 0, 0),
        utc(2026, 3, 29, 0, 30),
        utc(2026, 3, 29, 1, 0),
        utc(2026, 3, 29, 1, 30),
        utc(2026, 3, 29, 2, 0),
        utc(2026, 3, 29, 2, 30),
    ]


def test_cron_new_york_ambiguous_hour_runs_once() -> None:
    w = window(Cron("30 1 * * *"), NEW_YORK, hours=1)
    starts = [o.start for o in next_openings(w, utc(2026, 10, 31, 12), 2)]
    assert starts == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_lord_howe_half_hour_shift_keeps_elapsed_duration() -> None:
    w = window(Weekly(frozenset({SUN}), time(1, 0)), LORD_HOWE, hours=3)
    [opening] = next_openings(w, utc(2026, 10, 3), 1)
    assert opening.start == utc(2026, 10, 3, 14, 30)  # 01:00 +10:30
    assert opening.end == utc(2026, 10, 3, 17, 30)  # 04:30 +11:00 local, 3 real hours
    assert opening.end.astimezone(LORD_HOWE).time() == time(4, 30)


def test_kolkata_cron_weekdays() -> None:
    w = window(Cron("0 1 * * mon-fri"), KOLKATA, hours=2)
    starts = [o.start for o in next_openings(w, utc(2026, 11, 27, 0), 3)]
    # Fri 27 01:00 IST already passed at 00:00Z (05:30 IST); next Mon, Tue, Wed.
    assert starts == [
        utc(2026, 11, 29, 19, 30),
        utc(2026, 11, 30, 19, 30),
        utc(2026, 12, 1, 19, 30),
    ]


# --- crossing midnight, the week boundary, month ends -------------------------------------


def test_window_crossing_midnight_is_open_after_midnight() -> None:
    w = window(Weekly(frozenset({SAT}), time(22, 0)), BERLIN, hours=4)
    # Sat 2026-11-28 22:00 CET = 21:00Z; open until Sun 02:00 CET = 01:00Z.
    assert is_open(w, utc(2026, 11, 29, 0, 30))
    assert not is_open(w, utc(2026, 11, 29, 1, 0))
    assert time_left(w, utc(2026, 11, 29, 0, 30)) == timedelta(minutes=30)


def test_window_crossing_the_week_boundary() -> None:
    w = window(Weekly(frozenset({SUN}), time(23, 0)), KOLKATA, hours=6)
    at = datetime(2026, 11, 30, 3, 0, tzinfo=KOLKATA)  # Monday 03:00
    current = current_opening(w, at)
    assert current is not None
    assert current.start == datetime(2026, 11, 29, 23, 0, tzinfo=KOLKATA)
    assert is_open(w, at)
    assert not is_open(w, datetime(2026, 11, 30, 5, 0, tzinfo=KOLKATA))


def test_monthly_last_friday_and_fifth_monday() -> None:
    last_fri = window(MonthlyOrdinal(-1, FRI, time(20, 0)), BERLIN)
    starts = [
        o.start.astimezone(BERLIN).date() for o in next_openings(last_fri, utc(2026, 12, 1), 3)
    ]
    assert starts == [date(2026, 12, 25), date(2027, 1, 29), date(2027, 2, 26)]
    fifth_mon = window(MonthlyOrdinal(5, MON, time(0, 0)), BERLIN)
    starts = [
        o.start.astimezone(BERLIN).date() for o in next_openings(fifth_mon, utc(2026, 1, 1), 3)
    ]
    assert starts == [date(2026, 3, 30), date(2026, 6, 29), date(2026, 8, 31)]


def test_monthly_offset_crosses_into_next_month() -> None:
    # Last Monday of August 2026 is the 31st; +5 days is Saturday September 5th.
    w = window(MonthlyOrdinal(-1, MON, time(3, 0), offset_days=5), NEW_YORK)
    starts = [o.start.astimezone(NEW_YORK).date() for o in next_openings(w, utc(2026, 9, 1), 2)]
    assert starts == [date(2026, 9, 5), date(2026, 10, 3)]


def test_patch_tuesday_thursday() -> None:
    w = window(MonthlyOrdinal(2, TUE, time(22, 0), offset_days=2), BERLIN)
    starts = [o.start.astimezone(BERLIN) for o in next_openings(w, utc(2026, 11, 1), 3)]
    assert [s.date() for s in starts] == [date(2026, 11, 12), date(2026, 12, 10), date(2027, 1, 14)]
    assert all(s.weekday() == THU and s.time() == time(22, 0) for s in starts)


def test_cron_month_end() -> None:
    w = window(Cron("0 23 31 * *"), BERLIN)
    starts = [o.start.astimezone(BERLIN).date() for o in next_openings(w, utc(2027, 1, 1), 3)]
    assert starts == [date(2027, 1, 31), date(2027, 3, 31), date(2027, 5, 31)]


# --- freezes and cutoff -------------------------------------------------------------------


def test_freeze_clips_and_moves_the_cutoff() -> None:
    w = window(Weekly(frozenset({SAT}), time(0, 0)), ZoneInfo("UTC"), hours=6, cutoff_minutes=30)
    freeze = Freeze("f", utc(2026, 11, 28, 4), utc(2026, 11, 28, 8))
    [opening] = next_openings(w, utc(2026, 11, 27), 1, [freeze])
    assert opening.status == "clipped"
    assert opening.frozen_by == ("f",)
    assert [(p.start, p.end) for p in opening.open_parts] == [
        (utc(2026, 11, 28, 0), utc(2026, 11, 28, 4))
    ]
    assert may_start(w, utc(2026, 11, 28, 3, 29), [freeze])
    assert not may_start(w, utc(2026, 11, 28, 3, 30), [freeze])  # in the cutoff
    assert is_open(w, utc(2026, 11, 28, 3, 45), [freeze])
    assert not is_open(w, utc(2026, 11, 28, 4, 0), [freeze])  # frozen
    assert time_left(w, utc(2026, 11, 28, 3, 0), [freeze]) == timedelta(hours=1)


def test_freeze_in_the_middle_splits_the_window() -> None:
    w = window(Weekly(frozenset({SAT}), time(0, 0)), ZoneInfo("UTC"), hours=6)
    freeze = Freeze("f", utc(2026, 11, 28, 2), utc(2026, 11, 28, 3))
    [opening] = next_openings(w, utc(2026, 11, 27), 1, [freeze])
    assert [(p.start.hour, p.end.hour) for p in opening.open_parts] == [(0, 2), (3, 6)]
    assert not is_open(w, utc(2026, 11, 28, 2, 30), [freeze])
    assert may_start(w, utc(2026, 11, 28, 3, 0), [freeze])


def test_freeze_covering_the_window_freezes_it() -> None:
    w = window(Weekly(frozenset({SAT}), time(0, 0)), ZoneInfo("UTC"), hours=6)
    freeze = Freeze("f", utc(2026, 11, 27), utc(2026, 11, 29))
    first, second = next_openings(w, utc(2026, 11, 26), 2, [freeze])
    assert first.status == "frozen"
    assert first.open_parts == ()
    assert second.status == "open"
    assert not is_open(w, utc(2026, 11, 28, 1), [freeze])
    assert time_left(w, utc(2026, 11, 28, 1), [freeze]) == timedelta(0)


def test_cutoff_without_freeze() -> None:
    w = window(Weekly(frozenset({SAT}), time(0, 0)), ZoneInfo("UTC"), hours=2, cutoff_minutes=15)
    assert may_start(w, utc(2026, 11, 28, 1, 44, 59))
    assert not may_start(w, utc(2026, 11, 28, 1, 45))
    assert is_open(w, utc(2026, 11, 28, 1, 45))
    assert not may_start(w, utc(2026, 11, 28, 2, 0))


def test_openings_from_includes_the_current_opening() -> None:
    w = window(Weekly(frozenset({SAT}), time(0, 0)), ZoneInfo("UTC"), hours=2)
    at = utc(2026, 11, 28, 1)
    first = next(openings_from(w, at))
    assert first.start == utc(2026, 11, 28, 0)
    assert next_openings(w, at, 1)[0].start == utc(2026, 12, 5, 0)


# --- properties ---------------------------------------------------------------------------

ZONES = [BERLIN, NEW_YORK, LORD_HOWE, KOLKATA, ZoneInfo("UTC"), ZoneInfo("America/Santiago")]

weekly = st.builds(
    Weekly,
    st.frozensets(st.integers(0, 6), min_size=1),
    st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45])),
)
monthly = st.builds(
    MonthlyOrdinal,
    st.sampled_from([1, 2, 3, 4, 5, -1]),
    st.integers(0, 6),
    st.builds(time, st.integers(0, 23), st.sampled_from([0, 30])),
    st.integers(-10, 10),
)
cron = st.builds(
    lambda minute, hours, dow: Cron(f"{minute} {hours} * * {dow}"),
    st.sampled_from(["0", "30", "*/20", "15,45"]),
    st.sampled_from(["*", "1-3", "2", "0,12", "*/5", "23"]),
    st.sampled_from(["*", "mon-fri", "sun", "sat,sun"]),
)
windows = st.builds(
    lambda schedule, tz, minutes: Window("w", schedule, timedelta(minutes=minutes), tz),
    st.one_of(weekly, monthly, cron),
    st.sampled_from(ZONES),
    st.integers(1, 60 * 30),
)
instants = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)
)
freeze_lists = st.lists(
    st.builds(
        lambda start, hours: Freeze("f", start, start + timedelta(hours=hours)),
        instants,
        st.integers(1, 24 * 10),
    ),
    max_size=3,
)


@settings(max_examples=150, deadline=None)
@given(windows, instants, freeze_lists)
def test_openings_are_after_the_instant_increasing_and_exact(
    w: Window, at: datetime, freezes: list[Freeze]
) -> None:
    found = next_openings(w, at, 5, freezes)
    assert found, "every generated schedule opens again"
    assert all(o.start > at for o in found)
    assert all(a.start < b.start for a, b in itertools.pairwise(found))
    for opening in found:
        assert opening.end - opening.start == w.duration
        for part in opening.open_parts:
            assert opening.start <= part.start < part.end <= opening.end
            assert all(f.end <= part.start or f.start >= part.end for f in freezes)
        assert (opening.status == "open") == (not opening.frozen_by)


@settings(max_examples=150, deadline=None)
@given(windows, instants)
def test_opening_starts_fall_on_the_schedule(w: Window, at: datetime) -> None:
    for opening in next_openings(w, at, 4):
        local = opening.start.astimezone(w.tz)
        before = (opening.start - timedelta(seconds=1)).astimezone(w.tz)
        on_transition = before.utcoffset() != local.utcoffset()
        if isinstance(w.schedule, Weekly):
            assert on_transition or (
                local.weekday() in w.schedule.days and local.time() == w.schedule.start
            )


@settings(max_examples=200, deadline=None)
@given(windows, instants, freeze_lists)
def test_is_open_agrees_with_the_openings(w: Window, at: datetime, freezes: list[Freeze]) -> None:
    # Look from well before `at`, so the lookback inside is_open is checked independently.
    earlier = at - w.duration - timedelta(days=3)
    covering = [o for o in next_openings(w, earlier, 400, freezes) if o.start <= at < o.end]
    in_part = any(o.part_at(at) is not None for o in covering)
    assert is_open(w, at, freezes) == in_part
    assert (time_left(w, at, freezes) > timedelta(0)) == in_part
    if may_start(w, at, freezes):
        assert in_part
    frozen = any(f.start <= at < f.end for f in freezes)
    if frozen:
        assert not is_open(w, at, freezes)
