"""Value types shared by the config schemas: durations, limits, times of day, zones."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ConfigDict, PlainSerializer, PlainValidator

from patchd.durations import format_duration, parse_duration

STRICT = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


# Every duration is added to an instant somewhere (a window's end, a snapshot's expiry),
# which must stay inside the calendar datetime can hold.
MAX_DURATION = timedelta(days=36500)


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f'expected a duration string like "45m" or "1h30m", got {value!r}')
    try:
        parsed = parse_duration(value)
    except OverflowError:
        parsed = timedelta.max
    if parsed > MAX_DURATION:
        raise ValueError(f"{value!r} is longer than 100 years ({format_duration(MAX_DURATION)})")
    return parsed


Duration = Annotated[
    timedelta, PlainValidator(_duration), PlainSerializer(format_duration, return_type=str)
]


@dataclass(frozen=True)
class Limit:
    """A count, or a percentage of the targets in a run (like AWS's MaxConcurrency)."""

    count: int | None = None
    percent: float | None = None

    def resolve(self, total: int) -> int:
        """The count for a run of `total` targets: percentages round down, never below 1."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return max(1, math.floor(total * self.percent / 100))

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{self.percent:g}%"


def _limit(value: Any) -> Limit:
    if isinstance(value, Limit):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return Limit(count=value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", value)
        if match is None:
            raise ValueError(f'expected an integer or a percentage like "25%", got {value!r}')
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise ValueError(f"percentage must be above 0% and at most 100%, got {value!r}")
        return Limit(percent=percent)
    raise ValueError(f'expected an integer or a percentage like "25%", got {value!r}')


LimitValue = Annotated[Limit, PlainValidator(_limit), PlainSerializer(str, return_type=str)]


def _time_of_day(value: Any) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", value.strip())
        if match:
            hour, minute, second = (int(g) if g else 0 for g in match.groups())
            if hour < 24 and minute < 60 and second < 60:
                return time(hour, minute, second)
    raise ValueError(f'expected a time of day like "02:00", got {value!r}')


TimeOfDay = Annotated[time, PlainValidator(_time_of_day)]


def zone(name: str) -> ZoneInfo:
    """Look up an IANA zone; ValueError names the zone when it is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, IsADirectoryError, OSError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name like 'Europe/Berlin' or 'UTC')"
        ) from None


def _zone(value: Any) -> ZoneInfo:
    if isinstance(value, ZoneInfo):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected an IANA time zone name, got {value!r}")
    return zone(value)


Zone = Annotated[ZoneInfo, PlainValidator(_zone), PlainSerializer(str, return_type=str)]


def _moment(value: Any) -> datetime | date:
    if isinstance(value, datetime | date):
        return value
    if isinstance(value, str):
        for parse in (date.fromisoformat, datetime.fromisoformat):
            try:
                return parse(value)
            except ValueError:
                continue
    raise ValueError(
        "expected a TOML datetime with offset (2026-12-20T00:00:00+01:00) "
        f"or a local date (2026-12-20), got {value!r}"
    )


Moment = Annotated[datetime | date, PlainValidator(_moment)]


# A systemd credential's name (LoadCredential=NAME:...), as patchd reads it from
# $CREDENTIALS_DIRECTORY/NAME. The value is never echoed in the error: a secret pasted
# here by mistake would otherwise reach the journal.
_CREDENTIAL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")


def _credential_name(value: Any) -> str:
    if not isinstance(value, str) or not _CREDENTIAL.fullmatch(value):
        raise ValueError(
            "expected the name of a systemd credential (letters, digits, _ . @ -),"
            " not the secret itself"
        )
    return value


CredentialName = Annotated[str, PlainValidator(_credential_name)]
