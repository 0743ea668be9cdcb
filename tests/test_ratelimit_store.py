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


def test_a_redis_that_stops_answering_gets_503_within_the_store_timeout_for_every_waiting_request(
    redis: Redis,
) -> None:
    """Paused (SIGSTOP), Redis accepts connections and answers nothing: each of 40 requests on the
    pooled connections, and each that must connect anew, is refused after about the store timeout."""

    async def scenario() -> list[object]:
        limiter = RateLimiter(redis.url, local=False, store_timeout=0.5)
        limit = "100000/minute"
        await asyncio.gather(*(limiter.hit(f"key_{n}", limit) for n in range(40)))  # 40 pooled connections
        redis.pause()
        try:
            checks = [limiter.hit(f"key_{n}", limit) for n in range(60)]  # 20 more than the pool holds
            checks += [limiter.check_tokens(f"key_{n}", "1000/minute") for n in range(10)]
            return await asyncio.wait_for(asyncio.gather(*checks, return_exceptions=True), timeout=20)
        finally:
            redis.resume()

    outcomes = asyncio.run(scenario())
    assert len(outcomes) == 70
    assert {refusal(outcome)[:2] for outcome in outcomes} == {(503, "store_unavailable")}
