"""The small Redis client admission's scripts use (admission/redis_pipe.py): replies read whole however they
arrive, matched to their commands in order, errors kept to their command, scripts loaded again
when Redis forgot them, and each new connection prepared before anything else goes over it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.support.redis_server import Redis
from vllm_gateway.admission.redis_pipe import LuaScripts, RedisConnectionError, RedisError, RedisPipe, _Connection, pack


def test_a_command_is_an_array_of_bulk_strings() -> None:
    assert pack(("EVALSHA", "ab", 0, 1.5, b"\r\n")) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n$3\r\n1.5\r\n$2\r\n\r\n\r\n"
    )


def test_replies_cut_anywhere_are_read_whole_and_in_order() -> None:
    wire = b"*3\r\n$2\r\nok\r\n:-7\r\n*2\r\n$-1\r\n+PONG\r\n-ERR no such thing\r\n$0\r\n\r\n"

    async def feed_byte_by_byte() -> list[object]:
        connection = _Connection()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        connection.waiting.extend(futures)
        for index in range(len(wire)):
            connection.data_received(wire[index : index + 1])
        return await asyncio.gather(*futures, return_exceptions=True)

    first, second, third = asyncio.run(feed_byte_by_byte())
    assert first == [b"ok", -7, [None, b"PONG"]]
    assert isinstance(second, RedisError) and str(second) == "ERR no such thing"
    assert third == b""


def test_pipelined_commands_each_get_their_own_reply_and_an_error_stays_with_its_command(redis: Redis) -> None:
    async def scenario() -> tuple[list[object], object, int]:
        pipe = RedisPipe(redis.url)
        await pipe.call("DEL", "n")
        many = await asyncio.gather(*(pipe.call("INCR", "n") for _ in range(300)))
        failed = await asyncio.gather(pipe.call("INCR", "n"), pipe.call("HGET", "n", "x"), return_exceptions=True)
        database = await pipe.call("CLIENT", "INFO")
        pipe.close()
        return many, failed, int(database.split(b" db=")[1].split(b" ")[0])

    many, (after, wrong_type), database = asyncio.run(scenario())
    assert many == list(range(1, 301))
    assert after == 301
    assert isinstance(wrong_type, RedisError) and str(wrong_type).startswith("WRONGTYPE")
    assert database == 2  # the URL's database was selected


def test_after_redis_restarts_the_next_call_reconnects_and_loads_its_script_again(redis: Redis) -> None:
    async def scenario() -> tuple[object, object, object]:
        pipe = RedisPipe(redis.url)
        scripts = LuaScripts(pipe, {"double": "return tonumber(ARGV[1]) * 2"})
        before = await scripts.run("double", [21])
        redis.stop()
        try:
            down: object = await scripts.run("double", [1])
        except RedisConnectionError as error:
            down = error
        redis.start()  # empty: no script loaded
        after = await scripts.run("double", [5])
        pipe.close()
        return before, down, after

    before, down, after = asyncio.run(scenario())
    assert before == 42
    assert isinstance(down, RedisConnectionError)
    assert after == 10


def test_each_new_connection_is_prepared_before_any_other_command_and_a_dropped_one_is_told(redis: Redis) -> None:
    async def scenario() -> tuple[object, object, list[str], int]:
        told: list[str] = []

        async def prepare(call: Callable[..., Awaitable[object]]) -> None:
            await call("SET", "prepared", "yes")  # what a restarted Redis lacks, before anything else

        pipe = RedisPipe(redis.url, prepare=prepare, lost=lambda: told.append("lost"))
        before = await pipe.call("GET", "prepared")
        redis.stop()
        for _ in range(100):
            if told:
                break
            await asyncio.sleep(0.05)
        redis.start()  # empty
        after = await pipe.call("GET", "prepared")
        pipe.close()  # closed on purpose: not a loss
        await asyncio.sleep(0.1)
        return before, after, told, pipe.generation

    before, after, told, connections = asyncio.run(scenario())
    assert before == after == b"yes"
    assert told == ["lost"]
    assert connections == 2
