"""Per-key request rate limits on the `limits` library (the engine under slowapi).

Fixed windows: O(1) per request in memory and in Redis, exact across workers when the store is shared.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.storage import storage_from_string
from limits.aio.strategies import FixedWindowRateLimiter

from . import errors

Headers = list[tuple[bytes, bytes]]


def open_storage(uri: str) -> Storage:
    if uri.startswith("memory://"):
        return MemoryStorage()
    if uri.startswith(("redis://", "rediss://", "unix://")):
        uri = "async+" + uri
    return storage_from_string(uri, implementation="redispy")


@lru_cache(maxsize=256)
def parse_limit(text: str) -> RateLimitItem:
    return parse(text)


class RateLimiter:
    def __init__(self, default_limit: str, storage_uri: str) -> None:
        self.default_limit = default_limit
        self.storage = open_storage(storage_uri)
        self.strategy = FixedWindowRateLimiter(self.storage)

    async def hit(self, key_id: str, limit_text: str | None) -> Headers:
        """Count one request for this key; returns the rate-limit headers or raises a 429 error."""
        text = limit_text or self.default_limit
        item = parse_limit(text)
        allowed = await self.strategy.hit(item, "key", key_id)
        stats = await self.strategy.get_window_stats(item, "key", key_id)
        reset_in = max(1, math.ceil(stats.reset_time - time.time()))
        headers = [
            (b"x-ratelimit-limit-requests", str(item.amount).encode()),
            (b"x-ratelimit-remaining-requests", str(stats.remaining).encode()),
            (b"x-ratelimit-reset-requests", f"{reset_in}s".encode()),
        ]
        if not allowed:
            raise errors.rate_limited(text, reset_in, headers)
        return headers

    async def check_store(self) -> bool:
        return await self.storage.check()
