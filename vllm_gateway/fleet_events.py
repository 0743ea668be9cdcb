"""The fleet's event log, as `GET /admin/events` serves it.

The supervisor (vllm_fleet/supervisor.py) appends one JSON object a line to
VLLM_LOG_DIR/fleet_events.jsonl: starts, ready, exits, restarts, hangs, failures, adoptions and stops
of the model servers and the gateway. Events are few (a handful a day on a healthy host), so a
query reads the file through, keeping the newest matches only.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import errors

EVENT_FILE = "fleet_events.jsonl"  # vllm_fleet/events.py's name for it
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class EventQuery:
    models: Sequence[str] = ()  # none: every model
    events: Sequence[str] = ()  # none: every kind
    since: float | None = None  # unix seconds, inclusive
    until: float | None = None  # unix seconds, exclusive
    limit: int = DEFAULT_LIMIT


def moment(name: str, text: str) -> float:
    """A query time: unix seconds, or ISO 8601 (a time without a zone is UTC)."""
    try:
        return float(text) if text.replace(".", "", 1).isdigit() else _iso_seconds(text)
    except ValueError:
        raise errors.bad_request(
            f"{name} must be unix seconds or an ISO 8601 time such as 2026-12-03T06:00:00Z, not {text!r}.",
            param=name,
        ) from None


def _iso_seconds(text: str) -> float:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _events_in(path: Path) -> Iterator[dict[str, Any]]:
    try:
        file = path.open(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return  # no supervisor has run yet: no event
    with file:
        for line in file:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut by a full disk: the rest still counts
            if isinstance(event, dict) and isinstance(event.get("time"), str):
                yield event


def find_events(log_dir: Path, query: EventQuery) -> dict[str, object]:
    """The newest `limit` events that match, oldest first, as an OpenAI-style list."""
    kept: deque[dict[str, Any]] = deque(maxlen=query.limit + 1)
    for event in _events_in(log_dir / EVENT_FILE):
        if query.models and event.get("model") not in query.models:
            continue
        if query.events and event.get("event") not in query.events:
            continue
        if query.since is not None or query.until is not None:
            try:
                at = _iso_seconds(event["time"])
            except ValueError:
                continue
            if (query.since is not None and at < query.since) or (query.until is not None and at >= query.until):
                continue
        kept.append(event)
    has_more = len(kept) > query.limit
    if has_more:
        kept.popleft()
    return {"object": "list", "data": list(kept), "has_more": has_more}
