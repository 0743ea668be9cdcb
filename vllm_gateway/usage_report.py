"""Reading the usage ledger: pages in the shape of OpenAI's organization usage API
(`/v1/organization/usage/completions`) for `GET /admin/usage`, and the totals the `usage` and `keys
list` commands print. A page's sums are the store's (UsageStore.sums, in SQL, for a year of rows);
the commands' are totals() here."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from . import errors
from .usage_ledger import FIELDS, HOUR, Sum, UsageRow, UsageStore

BUCKET_SECONDS = {"1h": HOUR, "1d": 24 * HOUR}
# OpenAI's defaults and maxima for the number of buckets on a page.
DEFAULT_BUCKETS = {"1h": 24, "1d": 7}
MAX_BUCKETS = {"1h": 168, "1d": 31}
GROUPS = ("api_key_id", "model")
# Query numbers are ASCII digits and nothing else: int() would also take a sign, spaces, underscores,
# other scripts' digits, and raise (a 500) on a superscript or on more than 4,300 digits.
WHOLE_NUMBER = re.compile(r"[0-9]{1,12}")
# The last second of the year 9999: later than any query means, and a bound that keeps every figure
# computed from a time well inside SQLite's 64-bit integers.
MAX_UNIX_TIME = 253_402_300_799
SPAN = re.compile(r"([0-9]{1,6})([hdw])")
SPAN_SECONDS = {"h": HOUR, "d": 24 * HOUR, "w": 7 * 24 * HOUR}
# The end of a span that has none (the commands' "since"): later than any hour, within SQLite's integers.
NO_END = 2**62
REQUESTS, PROMPT, COMPLETION = (FIELDS.index(name) for name in ("requests", "prompt_tokens", "completion_tokens"))


@dataclass(frozen=True)
class UsageQuery:
    start_time: int
    end_time: int | None = None
    bucket_width: str = "1d"
    group_by: Sequence[str] = ()
    models: Sequence[str] = ()
    api_key_ids: Sequence[str] = ()
    limit: int | None = None
    page: str | None = None


def usage_page(store: UsageStore, query: UsageQuery, now: float | None = None) -> dict[str, object]:
    width = BUCKET_SECONDS.get(query.bucket_width)
    if width is None:
        raise errors.bad_request("bucket_width must be 1h or 1d: the ledger counts by the hour.", param="bucket_width")
    for group in query.group_by:
        if group not in GROUPS:
            raise errors.bad_request(f"group_by takes {' and '.join(GROUPS)}, not {group!r}.", param="group_by")
    limit = query.limit if query.limit is not None else DEFAULT_BUCKETS[query.bucket_width]
    if not 1 <= limit <= MAX_BUCKETS[query.bucket_width]:
        raise errors.bad_request(
            f"limit must be 1 to {MAX_BUCKETS[query.bucket_width]} for bucket_width {query.bucket_width}.",
            param="limit",
        )
    end = query.end_time if query.end_time is not None else int(now if now is not None else time.time()) + 1
    if query.start_time < 0 or end <= query.start_time:
        raise errors.bad_request("start_time must be before end_time, both unix seconds.", param="start_time")
    first = query.start_time // width * width
    if query.page is not None:
        cursor = int(query.page) if WHOLE_NUMBER.fullmatch(query.page) else None
        if cursor is None or cursor % width or not first <= cursor < end:
            raise errors.bad_request("page is not a cursor this query gave.", param="page")
        first = cursor
    # This page's buckets only, however long the span: a page holds at most `limit` of them.
    after = min(first + limit * width, end)
    starts = range(first, after, width)
    sums = store.sums(first, starts[-1] + width, width, query.group_by, query.api_key_ids, query.models)
    by_bucket: dict[int, list[Sum]] = {}
    for bucket_sums in sums:
        by_bucket.setdefault(bucket_sums[0], []).append(bucket_sums)
    buckets = [
        {
            "object": "bucket",
            "start_time": start,
            "end_time": start + width,
            "results": results(by_bucket.get(start, [])),
        }
        for start in starts
    ]
    more = after < end
    return {"object": "page", "data": buckets, "has_more": more, "next_page": str(after) if more else None}


def whole_number(name: str, text: str, maximum: int) -> int:
    """A query parameter that must be a whole number from 0 to `maximum` (see WHOLE_NUMBER)."""
    if WHOLE_NUMBER.fullmatch(text) is None or int(text) > maximum:
        raise errors.bad_request(f"{name} must be a whole number from 0 to {maximum}.", param=name)
    return int(text)


def results(sums: Sequence[Sum]) -> list[dict[str, object]]:
    """A bucket's results, one per group, in the order of key id and model."""
    return [
        {
            "object": "organization.usage.completions.result",
            "input_tokens": prompt,
            "output_tokens": completion,
            "num_model_requests": requests,
            "api_key_id": key_id,
            "model": model,
        }
        for _, key_id, model, requests, prompt, completion in sorted(sums, key=lambda s: (s[1] or "", s[2] or ""))
    ]


def totals(rows: Iterable[UsageRow], by: Sequence[str]) -> dict[tuple[str, ...], list[int]]:
    """Sum rows over everything but `by` (a subset of "key", "model", "hour"): {group: counts in FIELDS' order}."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for row in rows:
        group = tuple(str({"key": row.key_id, "model": row.model, "hour": row.hour}[name]) for name in by)
        counts = groups.setdefault(group, [0] * len(FIELDS))
        for index, name in enumerate(FIELDS):
            counts[index] += getattr(row, name)
    return groups


def key_totals(store: UsageStore, since: int) -> dict[str, tuple[int, int, int]]:
    """Requests, prompt and completion tokens of each key id in the hours from that of `since` on."""
    sums = store.sums(since // HOUR * HOUR, NO_END, NO_END, ["api_key_id"])  # one bucket: all of it
    return {str(key_id): (requests, prompt, completion) for _, key_id, _, requests, prompt, completion in sums}


def usage_table(
    store: UsageStore, since: int, by: Sequence[str], key_names: Mapping[str, str]
) -> list[dict[str, object]]:
    """The `usage` command's rows: each group's totals in the hours from that of `since` on, in the order
    of its groups; a key by its id and its name in `key_names` (`(revoked)` when gone), an hour in local time."""
    entries = []
    for group, counts in sorted(totals(store.rows(since // HOUR * HOUR, NO_END), by).items()):
        entry: dict[str, object] = {}
        for name, value in zip(by, group, strict=True):
            if name == "key":
                entry["key_id"], entry["key_name"] = value, key_names.get(value, "(revoked)")
            elif name == "hour":
                entry["hour"] = time.strftime("%Y-%m-%d %H:00", time.localtime(int(value)))
            else:
                entry[name] = value
        entry.update(zip(FIELDS, counts, strict=True))
        entries.append(entry)
    return entries


def parse_span(text: str) -> int:
    """`7d`, `12h`, `2w` -> seconds."""
    match = SPAN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a span such as 12h, 7d or 2w")
    return int(match.group(1)) * SPAN_SECONDS[match.group(2)]
