"""Duration strings such as "90s", "45m", "1h30m" or "2d": parsing and formatting."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PATTERN = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> timedelta:
    """Parse a duration made of day, hour, minute and second parts, in that order.

    Raises ValueError with a message fit for an operator.
    """
    cleaned = text.strip().lower()
    match = _PATTERN.match(cleaned)
    if not cleaned or match is None:
        raise ValueError(
            f"invalid duration {text!r}: use numbers with units d, h, m, s "
            'in that order, like "90s", "45m", "1h30m" or "2d"'
        )
    days, hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Format a timedelta the way parse_duration reads it ("1h30m", "0s")."""
    total = int(value.total_seconds())
    if total == 0:
        return "0s"
    sign = "-" if total < 0 else ""
    total = abs(total)
    parts = []
    for unit, size in _UNITS.items():
        amount, total = divmod(total, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return sign + "".join(parts)
