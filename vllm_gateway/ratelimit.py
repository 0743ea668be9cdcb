"""Per-key request rate limits: fixed windows, parsed and (when shared) stored by the `limits` library.

With one worker the counts live in this process: a dictionary entry per key, about a microsecond per
request. `limits`' own in-memory storages start a timer thread or task on every hit (22-50 us measured
here), which is too much for the hot path. With several workers the counts must be shared to be
exact, so they go to Redis through `limits` (the engine under slowapi).
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

from limits import RateLimitItem, parse
from limits.aio.strategies import FixedWindowRateLimiter
from limits.storage import storage_from_string

from . import errors

Headers = list[tuple[bytes, bytes]]


@lru_cache(maxsize=256)
def parse_limit(text: str) -> RateLimitItem:
    return parse(text)


class LocalWindows:
    """Fixed windows counted in this process: window start and count per (key, limit)."""

    def __init__(self) -> None:
        self.windows: dict[tuple[str, str], list[float]] = {}

    def hit(self, key_id: str, item: RateLimitItem, text: str) -> tuple[int, float]:
        """Count a hit; returns the count in the current window and when that window ends."""
        now = time.time()
        window = self.windows.get((key_id, text))
        if window is None or now >= window[0]:
            window = self.windows[(key_id, text)] = [now + item.get_expiry(), 0]
        window[1] += 1
        return int(window[1]), window[0]


class RateLimiter:
    def __init__(self, default_limit: str, storage_uri: str, local: bool) -> None:
        """`local`: count in this process (the storage is memory, whatever its spelling)."""
        self.default_limit = default_limit
        self.local: LocalWindows | None = None
        self.shared: FixedWindowRateLimiter | None = None
        if local:
            self.local = LocalWindows()
        else:
            if storage_uri.startswith(("redis://", "rediss://", "unix://")):
                storage_uri = "async+" + storage_uri
            self.shared = FixedWindowRateLimiter(storage_from_string(storage_uri, implementation="redispy"))

    async def hit(self, key_id: str, limit_text: str | None) -> Headers:
        """Count one request for this key; returns the rate-limit headers or raises a 429 error."""
        text = limit_text or self.default_limit
        item = parse_limit(text)
        if self.local is not None:
            count, reset_at = self.local.hit(key_id, item, text)
            allowed, remaining = count <= item.amount, max(0, item.amount - count)
        else:
            assert self.shared is not None
            allowed = await self.shared.hit(item, "key", key_id)
            stats = await self.shared.get_window_stats(item, "key", key_id)
            reset_at, remaining = stats.reset_time, stats.remaining
        reset_in = max(1, math.ceil(reset_at - time.time()))
        headers = [
            (b"x-ratelimit-limit-requests", str(item.amount).encode()),
            (b"x-ratelimit-remaining-requests", str(remaining).encode()),
            (b"x-ratelimit-reset-requests", f"{reset_in}s".encode()),
        ]
        if not allowed:
            raise errors.rate_limited(text, reset_in, headers)
        return headers
