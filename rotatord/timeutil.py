"""Time as a parameter: clocks, durations and timestamps."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = [
    "Clock",
    "SystemClock",
    "format_duration",
    "format_ts",
    "parse_duration",
    "parse_ts",
    "utcnow",
]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+)([smhdw])")


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    """The wall clock, timezone-aware UTC, truncated to milliseconds."""

    def now(self) -> datetime:
        return utcnow()


def utcnow() -> datetime:
    t = time.time()
    return datetime.fromtimestamp(round(t, 3), UTC)


def parse_duration(text: str) -> timedelta:
    """Parse ``"30d"``, ``"1h30m"``, ``"90s"`` or ``"0s"``; raise ValueError with a readable reason."""
    if not isinstance(text, str):
        raise ValueError("a duration is a string such as '30d', '12h', '10m' or '45s'")
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = 0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), e.g. '30d' or '1h30m'")
    return timedelta(seconds=total)


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return "-" + format_duration(-delta)
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])


def format_ts(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a ``Z`` suffix and millisecond precision."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(text: str | None) -> datetime | None:
    if text is None:
        return None
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp without a timezone: {text!r}")
    return value.astimezone(UTC)
