"""The rate and token limits over a real Redis that stops and restarts (ratelimit.py): while it is
away a request gets 503 store_unavailable, not an error the gateway did not expect, and once it is
back no count fails on a connection made before it went."""

from __future__ import annotations

import asyncio

from tests.support.redis_server import Redis
from vllm_gateway.errors import GatewayError
from vllm_gateway.ratelimit import RateLimiter


def refusal(outcome: object) -> tuple[int, str | None, list[tuple[bytes, bytes]]]:
    assert isinstance(outcome, GatewayError), outcome
    return outcome.status, outcome.code, outcome.headers


def test_without_redis_a_request_and_a_token_check_get_503_store_unavailable(redis: Redis) -> None:
    async def scenario() -> tuple[object, object]:
        limiter = RateLimiter(redis.url, local=False)
        await limiter.hit("key_a", "100/minute")
        redis.stop()
        outcomes = []
        for check in (limiter.hit("key_a", "100/minute"), limiter.check_tokens("key_a", "1000/minute")):
            try:
                await check
            except Exception as error:
                outcomes.append(error)
        return outcomes[0], outcomes[1]

    hit, tokens = asyncio.run(scenario())
    assert refusal(hit) == (503, "store_unavailable", [(b"retry-after", b"1")])
    assert refusal(tokens) == (503, "store_unavailable", [(b"retry-after", b"1")])
    assert "rate limit" in str(hit) and "token limit" in str(tokens)


def test_after_redis_restarts_no_count_fails_on_a_connection_from_before(redis: Redis) -> None:
    async def scenario() -> list[object]:
        limiter = RateLimiter(redis.url, local=False)
        limit = "100000/minute"
        await asyncio.gather(*(limiter.hit(f"key_{n}", limit) for n in range(40)))  # 40 pooled connections
        redis.stop()
        redis.start()
        return await asyncio.gather(*(limiter.hit(f"key_{n}", limit) for n in range(40)), return_exceptions=True)

    after = asyncio.run(scenario())
    assert [item for item in after if isinstance(item, BaseException)] == []
