"""The access log's request lines as data, for `GET /admin/requests` and a model server's recent
errors (console_api.py): each line access_log.py wrote, parsed back into its fields, newest first,
filtered by key, model and status.

Only the end of the log is read (file_tail.py), within GATEWAY_CONSOLE_REQUEST_SCAN_BYTES: a filter
that matches no recent line costs that bound, not the whole file. Before a line is parsed, words that a
match must contain are looked for in it (one substring search each), so most lines a filter refuses
cost no parse.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from .access_log import escape, without_keys
from .file_tail import BackwardLines

ACCESS = " INFO access "
STAMP_SIZE = len("2026-11-25 15:43:15,885")
# A word of the line: unquoted characters, or a value access_log.escape quoted (with \" and \\ inside).
WORD = re.compile(r'(?:[^\s"]|"(?:[^"\\]|\\.)*")+')
STATUS_CODE = re.compile(r"[1-5][0-9][0-9]")
STATUS_CLASS = re.compile(r"[1-5]xx")

Entry = dict[str, Any]


class LineFilter(Protocol):
    """Which request lines a query wants: `hints`, groups of words of which a line must hold one in each
    group (a quick refusal before the parse), and `matches` for the parsed line."""

    @property
    def hints(self) -> Sequence[tuple[str, ...]]: ...
    def matches(self, entry: Entry) -> bool: ...


@dataclass(frozen=True)
class RequestFilter:
    """`GET /admin/requests`'s filters: a key's id or name, the names of a model (any of them), a status
    (`404`) or a status class (`4xx`); None or empty: any."""

    key: str | None = None
    models: frozenset[str] = frozenset()
    status: str | None = None
    hints: tuple[tuple[str, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        hints: list[tuple[str, ...]] = []
        if self.key is not None and escape(self.key) == self.key:
            hints.append((self.key,))
        if self.models and all(escape(name) == name for name in self.models):
            hints.append(tuple(f" model={name} " for name in self.models))
        if self.status is not None:
            hints.append((f" status={self.status.removesuffix('xx')}",))
        object.__setattr__(self, "hints", tuple(hints))

    def matches(self, entry: Entry) -> bool:
        if self.key is not None and self.key not in (entry["key_id"], entry["key_name"]):
            return False
        if self.models and entry["model"] not in self.models:
            return False
        if self.status is not None:
            wanted = self.status.removesuffix("xx")
            return str(entry["status"]).startswith(wanted)
        return True


@dataclass(frozen=True)
class ServerErrors:
    """A model server's errors, of the lines of its model (`models`, its names): a 5xx that it or the
    gateway answered for the model, or a 4xx that the server itself answered (not a client that left,
    499, nor the gateway's own refusals, which name no server)."""

    models: frozenset[str]
    backend: str

    @property
    def hints(self) -> tuple[tuple[str, ...], ...]:
        errors = (" status=4", " status=5")
        if all(escape(name) == name for name in self.models):
            return (errors, tuple(f" model={name} " for name in self.models))
        return (errors,)

    def matches(self, entry: Entry) -> bool:
        status, backend = entry["status"], entry["backend"]
        if entry["model"] not in self.models or backend not in (self.backend, None):
            return False
        return bool(status >= 500 or (400 <= status < 500 and status != 499 and backend == self.backend))


def status_filter(text: str) -> bool:
    """Whether `text` is a status (`404`) or a status class (`4xx`), as the filter takes them."""
    return bool(STATUS_CODE.fullmatch(text) or STATUS_CLASS.fullmatch(text))


def find_requests(paths: Sequence[Path], wanted: LineFilter, limit: int, scan_bytes: int) -> tuple[list[Entry], bool]:
    """The newest `limit` request lines of the log (`paths`: the log, then its rotated copy) that
    `wanted` takes, newest first, and whether there may be more: another match, or lines the bound
    `scan_bytes` left unread."""
    lines = BackwardLines(paths, scan_bytes)
    found: list[Entry] = []
    for entry in entries(lines, wanted.hints):
        if wanted.matches(entry):
            if len(found) == limit:
                return found, True
            found.append(entry)
    return found, not lines.complete


def entries(lines: Iterable[str], hints: Sequence[tuple[str, ...]] = ()) -> Iterable[Entry]:
    """The request lines among `lines`, parsed, that hold a word of each group of `hints`."""
    for line in lines:
        if not line.startswith(ACCESS, STAMP_SIZE):
            continue  # one of the gateway's events
        if hints and not holds_hints(line, hints):
            continue
        entry = parse(line)
        if entry is not None:
            yield entry


def holds_hints(line: str, hints: Sequence[tuple[str, ...]]) -> bool:
    # Plain loops: the same test as all(any(...)) at a fraction of its cost, on every line scanned.
    for group in hints:
        for hint in group:
            if hint in line:
                break
        else:
            return False
    return True


def parse(line: str) -> Entry | None:
    """One request line's fields (docs/logs.md), None for a line of another shape. Every text field is
    searched for a key's shape once more (access_log.without_keys): a line from an older gateway, or
    written by hand, shows none either."""
    words = WORD.findall(line, STAMP_SIZE + len(ACCESS))
    if len(words) < 8 or not words[0].startswith("rid="):
        return None
    values = dict(word.split("=", 1) for word in words[3:] if "=" in word)
    try:
        moment = f"{utc_second(line[:19])}.{int(line[20:23]):03d}Z"
        status = int(values["status"])
        key = shown(values["key"])
        entry: Entry = {
            "time": moment,
            "request_id": shown(words[0][4:]),
            "method": shown(words[1]),
            "path": shown(words[2]),
            "status": status,
            "duration_ms": float(values["duration_ms"]),
            "key": None if key == "-" else key,
            "key_id": None,
            "key_name": None,
            "model": optional(values["model"]),
            "backend": optional(values["backend"]),
            "prompt_tokens": count(values.get("prompt_tokens")),
            "completion_tokens": count(values.get("completion_tokens")),
            "prompt_from": optional(values.get("prompt_from", "-")),
            "queue_ms": milliseconds(values.get("queue_ms")),
            "wake_ms": milliseconds(values.get("wake_ms")),
        }
    except (KeyError, ValueError):
        return None
    if entry["key"] is not None:
        key_id, _, name = values["key"].partition("(")
        entry["key_id"], entry["key_name"] = shown(key_id), shown(name.removesuffix(")"))
    return entry


@functools.lru_cache(maxsize=4096)
def utc_second(local: str) -> str:
    """A log line's second, in the local time the log writes, as UTC ISO 8601 (as the fleet's events
    give theirs): one conversion per second of the log, not per line."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(datetime.fromisoformat(local).timestamp()))


def shown(value: str) -> str:
    """A logged value as it was before access_log.escape quoted it, with no key in it."""
    if value.startswith('"') or '"' in value:
        value = unquoted(value)
    return without_keys(value)


def unquoted(value: str) -> str:
    # escape() wrote unicode_escape inside double quotes (a quote as \"), anywhere in the word.
    def unescape(match: re.Match[str]) -> str:
        return match[0][1:-1].encode("ascii", "backslashreplace").decode("unicode_escape")

    return re.sub(r'"(?:[^"\\]|\\.)*"', unescape, value)


def optional(value: str) -> str | None:
    return None if value == "-" else shown(value)


def count(text: str | None) -> int | None:
    # None: not in the line, or `None` (nothing delivered: docs/logs.md)
    return None if text is None or text == "None" else int(text)


def milliseconds(text: str | None) -> float | None:
    return None if text is None else float(text)
