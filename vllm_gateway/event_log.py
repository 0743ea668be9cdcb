"""Queries of the JSON-lines event logs the admin API serves: the fleet's (`GET /admin/events`) and
the keys' audit trail (`GET /admin/audit`).

The supervisor (vllm_fleet/supervisor.py) appends one JSON object a line to
VLLM_LOG_DIR/fleet_events.jsonl: starts, ready, exits, restarts, hangs, failures, adoptions and stops
of the model servers and the gateway; audit.py appends the key changes to GATEWAY_LOG_DIR/audit.jsonl.
Both are few (a handful a day), so a query reads the file through, keeping the newest matches only.
Each line has a `time` (ISO 8601, UTC).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import errors, time_text

FLEET_EVENT_FILE = "fleet_events.jsonl"  # vllm_fleet/events.py's name for it
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class EventQuery:
    # Each (fields, values): one of the fields holds one of the values (no values: anything goes).
    match: Sequence[tuple[tuple[str, ...], Sequence[str]]] = ()
    since: float | None = None  # unix seconds, inclusive
    until: float | None = None  # unix seconds, exclusive
    limit: int = DEFAULT_LIMIT


def moment(name: str, text: str) -> float:
    """A query time: unix seconds, or ISO 8601 (a time without a zone is UTC)."""
    try:
        return time_text.moment(text)
    except ValueError:
        raise errors.bad_request(
            f"{name} must be unix seconds or an ISO 8601 time such as 2026-12-03T06:00:00Z, not {text!r}.",
            param=name,
        ) from None


def _events_in(path: Path) -> Iterator[dict[str, Any]]:
    try:
        file = path.open(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return  # nothing has happened yet
    with file:
        for line in file:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut by a full disk: the rest still counts
            if isinstance(event, dict) and isinstance(event.get("time"), str):
                yield event


def find_events(path: Path, query: EventQuery) -> dict[str, object]:
    """The newest `limit` events of the file that match, oldest first, as an OpenAI-style list."""
    kept: deque[dict[str, Any]] = deque(maxlen=query.limit + 1)
    for event in _events_in(path):
        if any(values and not any(event.get(field) in values for field in fields) for fields, values in query.match):
            continue
        if query.since is not None or query.until is not None:
            try:
                at = time_text.moment(event["time"])
            except ValueError:
                continue
            if (query.since is not None and at < query.since) or (query.until is not None and at >= query.until):
                continue
        kept.append(event)
    has_more = len(kept) > query.limit
    if has_more:
        kept.popleft()
    return {"object": "list", "data": list(kept), "has_more": has_more}
