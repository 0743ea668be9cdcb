"""Times a key is given: when it expires, and how long a rotated key's old secret keeps working.

The API takes unix seconds or an ISO 8601 time (a date alone is its midnight, UTC unless the text says
otherwise); the CLI takes those or a span from now: 30d, 12h, 90m, 45s.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

SPAN = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def span_seconds(text: str) -> float | None:
    """Seconds of a span such as 30d, 12h, 90m or 45s (or a plain number of seconds), else None."""
    match = SPAN.fullmatch(text.strip())
    if match is not None:
        return float(match[1]) * SPAN_SECONDS[match[2]]
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def moment(value: object) -> float:
    """Unix seconds of unix seconds or an ISO 8601 time or date; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(value)
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return float(value)  # unix seconds written as text; ValueError again when not
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def expiry_from_cli(text: str) -> float:
    """`--expires`: a span from now (30d), or a date or time (2027-01-31, 2027-01-31T12:00:00Z)."""
    seconds = span_seconds(text) if SPAN.fullmatch(text.strip()) else None
    return time.time() + seconds if seconds is not None else moment(text)


def shown(stamp: float | None) -> str:
    """An expiry as `keys list` shows it: UTC, to the minute."""
    if stamp is None:
        return "never"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
