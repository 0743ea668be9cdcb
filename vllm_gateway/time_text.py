"""Times as people give them: a key's expiry, a rotated key's grace, the bounds of an event query.

A moment is unix seconds (a number, or digits as text) or an ISO 8601 time or date (a date alone is
its midnight; UTC unless the text says otherwise); the CLI also takes a span from now: 30d, 12h,
90m, 45s. Digits are read as seconds first, so `20270131` is a unix time, never a date, wherever a
time is given; `nan`, `inf`, `1e9`, negative numbers and times after the year 9999 (which no
date can show) are no time at all.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime

LAST_MOMENT = 253402300799.0  # 9999-12-31T23:59:59Z
SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
SPAN = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def span_seconds(text: str) -> float | None:
    """Seconds of a span such as 30d, 12h, 90m or 45s (or a plain number of seconds), else None."""
    text = text.strip()
    if SECONDS.fullmatch(text):
        return float(text)
    match = SPAN.fullmatch(text)
    return float(match[1]) * SPAN_SECONDS[match[2]] if match is not None else None


def moment(value: object) -> float:
    """Unix seconds of unix seconds or an ISO 8601 time or date; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif not isinstance(value, str):
        raise ValueError(value)
    elif SECONDS.fullmatch(value.strip()):
        seconds = float(value)
    else:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))  # ValueError: not ISO 8601
        seconds = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if not (math.isfinite(seconds) and 0 <= seconds <= LAST_MOMENT):
        raise ValueError(value)
    return seconds


def expiry_from_cli(text: str) -> float:
    """`--expires`: a span from now (30d), or a date or time (2027-01-31, 2027-01-31T12:00:00Z)."""
    match = SPAN.fullmatch(text.strip())
    return time.time() + float(match[1]) * SPAN_SECONDS[match[2]] if match is not None else moment(text)


def shown(stamp: float | None) -> str:
    """An expiry as `keys list` shows it: UTC, to the minute."""
    if stamp is None:
        return "never"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
