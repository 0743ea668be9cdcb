"""Per-key limits on requests and on tokens: fixed windows, parsed and (when shared) stored by `limits`.

A limit is one or more windows joined with `;` (`100/minute;2000/day`); every one of them applies.

Requests are counted as they come. Tokens can only be counted when the answer ends (prompt plus
completion, from its usage), so a request is admitted while its key's token windows have tokens
left, and its whole usage is added afterwards: a request that goes over exhausts the window, and the
next one is refused. Fixed windows are what make a cost added after the fact simple and exact.

With one worker the counts live in this process: a dictionary entry per window, about a microsecond
per request, written to a small file once a second when they changed (window_file.py) so that a
restart keeps them. `limits`' own in-memory storages start a timer thread or task on every hit (22-50 us
measured here), which is too much for the hot path. With several workers the counts must be shared to
be exact, so they go to Redis through `limits` (the engine under slowapi), whose increments by any
amount are atomic there. When Redis does not answer, the request gets 503 `store_unavailable`
(errors.store_unavailable) rather than going uncounted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from functools import lru_cache
from typing import Any, Final, TypeVar

from limits import RateLimitItem, parse_many
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from . import errors
from .store_outage import Outage

log = logging.getLogger("vllm_gateway")

Headers = list[tuple[bytes, bytes]]
Answer = TypeVar("Answer")
WindowId = tuple[str, str, int, int]

REQUESTS: Final = "key"  # the namespace of request counts (as before token limits, so counts carry over)
TOKENS: Final = "tokens"


@lru_cache(maxsize=256)
def parse_limits(text: str) -> tuple[RateLimitItem, ...]:
    """The windows of a limit such as `40000/minute;2000000/day`; raises ValueError when it does not parse."""
    items = tuple(parse_many(text))
    if not items:
        raise ValueError(f"no limit in {text!r}")
    return items


@lru_cache(maxsize=256)
def window_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """parse_limits' windows as (amount, seconds), which the one-worker path reads for every request."""
    return tuple((item.amount, item.get_expiry()) for item in parse_limits(text))


def check_limit_text(value: str | None) -> str | None:
    """For validators: `value` unchanged when it parses (None is no limit of the key's own)."""
    if value is not None:
        parse_limits(value)
    return value


class LocalWindows:
    """Fixed windows counted in this process: window end and count per (namespace, key, window)."""

    def __init__(self) -> None:
        self.windows: dict[WindowId, list[float]] = {}
        self.changes = 0  # hits so far: window_file.py writes the windows when this moved

    def hit(
        self, namespace: str, key_id: str, amount: int, seconds: int, cost: int = 1, now: float | None = None
    ) -> tuple[int, float]:
        """Add `cost` to the window of `amount` per `seconds`; returns the count in the current window
        and when that window ends."""
        if now is None:
            now = time.time()
        window_id = (namespace, key_id, amount, seconds)
        window = self.windows.get(window_id)
        if window is None or now >= window[0]:
            window = self.windows[window_id] = [now + seconds, 0]
        window[1] += cost
        self.changes += 1
        return int(window[1]), window[0]

    def peek(self, namespace: str, key_id: str, item: RateLimitItem) -> tuple[int, float]:
        """The count in the current window and when it ends (a full window from now when none is open)."""
        now = time.time()
        window = self.windows.get((namespace, key_id, item.amount, item.get_expiry()))
        if window is None or now >= window[0]:
            return 0, now + item.get_expiry()
        return int(window[1]), window[0]


class RateLimiter:
    def __init__(self, storage_uri: str, local: bool, store_timeout: float = 5.0) -> None:
        """`local`: count in this process (the storage is memory, whatever its spelling).
        `store_timeout`: seconds a shared store may take to connect or answer."""
        self.local: LocalWindows | None = None
        self.shared: FixedWindowRateLimiter | None = None
        self.store_timeout = store_timeout
        self.outage = Outage("rate limiter")
        if local:
            self.local = LocalWindows()
        else:
            options: dict[str, Any] = {}
            if storage_uri.startswith(("redis://", "rediss://", "unix://")):
                storage_uri = "async+" + storage_uri
                options = redis_options(store_timeout)
            storage = storage_from_string(storage_uri, implementation="redispy", wrap_exceptions=True, **options)
            self.shared = FixedWindowRateLimiter(storage)

    async def hit(self, key_id: str, text: str) -> Headers:
        """Count one request for this key against `text`, its rate limit in force (key_limits.py);
        returns the rate-limit headers or raises a 429 error.

        The headers tell the window with the fewest requests left; Retry-After the last one to reopen."""
        if self.local is not None:
            return self._hit_local(key_id, text)
        allowed = True
        tightest: tuple[int, int, int] | None = None  # remaining, limit, seconds to reset
        retry_after = 1
        for item in parse_limits(text):
            assert self.shared is not None
            what = "this request could not be counted against its key's rate limit"
            fits = await self._from_store(self.shared.hit(item, REQUESTS, key_id), what)
            stats = await self._from_store(self.shared.get_window_stats(item, REQUESTS, key_id), what)
            if self.outage.since is not None:
                self.outage.answered()
            reset_at, remaining = stats.reset_time, stats.remaining
            reset_in = max(1, math.ceil(reset_at - time.time()))
            if tightest is None or remaining < tightest[0]:
                tightest = (remaining, item.amount, reset_in)
            if not fits:
                allowed, retry_after = False, max(retry_after, reset_in)
        assert tightest is not None
        headers = window_headers(b"requests", *tightest)
        if not allowed:
            raise errors.rate_limited(text, retry_after, headers)
        return headers

    def _hit_local(self, key_id: str, text: str) -> Headers:
        """hit() with the counts in this process: the same answer without a coroutine per window and
        with one clock reading, since it runs for every request of a one-worker gateway."""
        assert self.local is not None
        now = time.time()
        tightest: tuple[int, int, float] | None = None  # remaining, limit, window end
        retry_at = 0.0
        for amount, seconds in window_sizes(text):
            count, reset_at = self.local.hit(REQUESTS, key_id, amount, seconds, 1, now)
            remaining = amount - count if count < amount else 0
            if tightest is None or remaining < tightest[0]:
                tightest = (remaining, amount, reset_at)
            if count > amount:
                retry_at = max(retry_at, reset_at)
        assert tightest is not None
        remaining, amount, reset_at = tightest
        headers = window_headers(b"requests", remaining, amount, max(1, math.ceil(reset_at - now)))
        if retry_at:
            raise errors.rate_limited(text, max(1, math.ceil(retry_at - now)), headers)
        return headers

    async def check_tokens(self, key_id: str, limit_text: str) -> Headers:
        """Before a request goes upstream: its key's token windows as headers, or a 429 error when
        one of them is used up."""
        allowed = True
        tightest: tuple[int, int, int] | None = None
        retry_after = 1
        for item in parse_limits(limit_text):
            if self.local is not None:
                used, reset_at = self.local.peek(TOKENS, key_id, item)
            else:
                used, reset_at = await self._shared_window(
                    TOKENS, key_id, item, "its key's token limit could not be checked"
                )
            remaining = max(0, item.amount - used)
            reset_in = max(1, math.ceil(reset_at - time.time()))
            if tightest is None or remaining < tightest[0]:
                tightest = (remaining, item.amount, reset_in)
            if remaining == 0:
                allowed, retry_after = False, max(retry_after, reset_in)
        assert tightest is not None
        headers = window_headers(b"tokens", *tightest)
        if not allowed:
            raise errors.tokens_limited(limit_text, retry_after, headers)
        return headers

    async def windows(self, key_id: str, limit_text: str, kind: str) -> list[dict[str, object]]:
        """Each window of a key's limit as it stands, without counting anything (GET /v1/usage):
        its limit, what is used and left, and the seconds until it starts over. `kind`: "requests"
        or "tokens"."""
        namespace = REQUESTS if kind == "requests" else TOKENS
        shown = []
        for item in parse_limits(limit_text):
            if self.local is not None:
                used, reset_at = self.local.peek(namespace, key_id, item)
            else:
                used, reset_at = await self._shared_window(
                    namespace, key_id, item, "its key's windows could not be read"
                )
            per = item.GRANULARITY.name if item.multiples == 1 else f"{item.multiples} {item.GRANULARITY.name}"
            shown.append(
                {
                    "window": f"{item.amount}/{per}",
                    "limit": item.amount,
                    "used": min(used, item.amount) if kind == "requests" else used,
                    "remaining": max(0, item.amount - used),
                    "resets_in_s": max(0, math.ceil(reset_at - time.time())),
                }
            )
        return shown

    async def _from_store(self, call: Awaitable[Answer], what: str) -> Answer:
        """The shared store's answer to `call`, or a 503 saying `what`. redis-py bounds each connect
        and read by the store timeout; this bounds the whole of one call (its retry on a fresh
        connection, a wait for the pool) by the same, so that a store that stops answering never
        holds a request longer than that."""
        try:
            async with asyncio.timeout(self.store_timeout):
                return await call
        except StorageError as error:
            self.outage.failed(error.storage_error)
            raise errors.store_unavailable(what) from None
        except TimeoutError:
            self.outage.failed(TimeoutError(f"no answer in {self.store_timeout:g} s"))
            raise errors.store_unavailable(what) from None

    async def _shared_window(self, namespace: str, key_id: str, item: RateLimitItem, what: str) -> tuple[int, float]:
        """LocalWindows.peek for the shared store: the count in the window and when it ends (a full
        window from now when none is open); a 503 saying `what` when the store fails."""
        assert self.shared is not None
        stats = await self._from_store(self.shared.get_window_stats(item, namespace, key_id), what)
        used = item.amount - stats.remaining
        return used, stats.reset_time if used else time.time() + item.get_expiry()

    async def count_tokens(self, key_id: str, limit_text: str, tokens: int) -> None:
        """After an answer: add its tokens to every window of the key's token limit, in full, even
        past the limit (the answer is already out; the next request is refused instead)."""
        if tokens <= 0:
            return
        for item in parse_limits(limit_text):
            if self.local is not None:
                self.local.hit(TOKENS, key_id, item.amount, item.get_expiry(), tokens)
                continue
            assert self.shared is not None
            try:
                async with asyncio.timeout(self.store_timeout):
                    await self.shared.hit(item, TOKENS, key_id, cost=tokens)
            except Exception as error:  # the store failed after the answer: the client has it, say so here
                reason = str(error) or f"no answer in {self.store_timeout:g} s"
                log.warning("could not count %d tokens of key %s in %s: %s", tokens, key_id, item, reason)


def redis_options(timeout: float) -> dict[str, Any]:
    """redis-py's options for the limits' Redis: answers within `timeout` seconds, and a command
    that finds its pooled connection dead (Redis restarted since) tries once more on a new one, so
    that a restart costs no request beyond those made while Redis was down. redis-py retries
    nothing for a pool made from a URL, so without this each stale connection failed a request."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }


def window_headers(kind: bytes, remaining: int, limit: int, reset_in: int) -> Headers:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens} headers."""
    return [
        (b"x-ratelimit-limit-" + kind, b"%d" % limit),
        (b"x-ratelimit-remaining-" + kind, b"%d" % remaining),
        (b"x-ratelimit-reset-" + kind, b"%ds" % reset_in),
    ]
