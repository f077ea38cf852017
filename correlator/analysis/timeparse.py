"""Times on the command line: RFC 3339 (``2026-11-22T14:02:00Z``) or relative (``15m``, ``1h30m``, ``2d``),
relative meaning that long before an anchor (the last data, or now)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_UNITS_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9, "w": 7 * 86400 * 10**9}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_RELATIVE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")


class TimeParseError(ValueError):
    pass


def parse_duration_ns(text: str) -> int:
    """``90s``, ``15m``, ``1h30m`` → nanoseconds."""
    s = text.strip()
    if not s:
        raise TimeParseError("empty duration")
    total, rest = 0, s
    while rest:
        m = _DURATION.match(rest)
        if not m:
            raise TimeParseError(f"{text!r} is not a duration like 90s, 15m, 1h30m or 2d")
        total += int(float(m.group(1)) * _UNITS_NS[m.group(2)])
        rest = rest[m.end():]
    return total


def parse_time_ns(text: str, anchor_ns: int) -> int:
    """RFC 3339 → UTC ns; a duration → ``anchor_ns`` minus it; ``now`` → the anchor."""
    s = text.strip()
    if s in ("now", "last"):
        return anchor_ns
    if _RELATIVE.fullmatch(s):
        return anchor_ns - parse_duration_ns(s)
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as e:
        raise TimeParseError(f"{text!r} is neither RFC 3339 (2026-11-22T14:02:00Z) nor relative (15m)") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def format_ns(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_clock(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns / 1e9, UTC).strftime("%H:%M:%S")
