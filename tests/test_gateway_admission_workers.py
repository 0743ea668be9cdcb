"""Admission with several workers: the counts and the queues live in Redis, so a backend's capacity,
the fair order and a disconnect while waiting hold for the gateway as a whole, not per worker.

Each request goes on a connection of its own, so the kernel spreads them over both workers (each
worker's metrics snapshot shows it served some).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.chat import chat_body
from tests.support.clients import client_tls
from tests.support.gateway import Backend, Gateway, Reader, raw_post
from tests.support.processes import Simulator, wait_until, wait_until_async
from tests.support.redis_server import Redis

CHAT = "/v1/chat/completions"


def chat(max_tokens: int, stream: bool = True) -> dict[str, object]:
    return chat_body("sim", max_tokens=max_tokens, stream=stream)


@pytest.fixture
def simulator(tmp_path: Path):
    # A big engine, generating 20 tokens a second: whatever the gateway sends runs at once.
    with Simulator.start(tmp_path, "--max-num-seqs", "64", "--token-rate", "20") as simulator:
        yield simulator


def start_two_workers(
    tmp_path: Path, simulator: Simulator, redis_url: str, env: dict[str, str] | None = None, **capacity: str
) -> Gateway:
    env = {"GATEWAY_WORKERS": "2", "GATEWAY_RATE_LIMIT_STORAGE": redis_url, **(env or {})}
    backend = Backend("sim", simulator.base_url, path="/models/sim", **capacity)
    gateway = Gateway.start(tmp_path / "gw", [backend], env=env)
    # Gateway.start has waited for both workers; gateway.requests_by_worker reads the metrics snapshot each
    # writes a second after it started.
    try:
        wait_until(lambda: len(list((gateway.workdir / "run" / "metrics").glob("*.json"))) == 2, timeout=60)
    except TimeoutError:
        gateway.stop()
        raise
    return gateway


def fresh_client(gateway: Gateway) -> httpx.AsyncClient:
    # No keep-alive: every request is a new connection, which either worker may accept.
    return httpx.AsyncClient(
        base_url=gateway.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0), verify=client_tls()
    )


async def stream_through(gateway: Gateway, key: str, max_tokens: int) -> int:
    async with fresh_client(gateway) as client:
        headers = {"Authorization": f"Bearer {key}"}
        async with client.stream("POST", CHAT, json=chat(max_tokens), headers=headers) as response:
            async for _ in response.aiter_bytes():
                pass
            return response.status_code


def workers_that_answered(gateway: Gateway) -> int:
    """Workers whose metrics snapshot counts a chat request."""

    def served() -> int:
        return sum(count > 0 for count in gateway.requests_by_worker("sim"))

    try:
        return int(wait_until(lambda: served() == 2 and 2, timeout=5))
    except TimeoutError:
        return served()


def test_two_workers_together_never_send_a_backend_more_than_its_capacity(
    tmp_path: Path, simulator: Simulator, redis_url: str
) -> None:
    with start_two_workers(tmp_path, simulator, redis_url, max_num_seqs="4") as gateway:

        async def twenty_four_streams() -> list[int]:
            # A little apart, so that both workers take some (a burst goes to one, whose loop
            # accepts the whole backlog); each stream lasts half a second, so about ten want to run
            # at once, more than one worker alone would let through.
            streams = []
            for _ in range(24):
                streams.append(asyncio.create_task(stream_through(gateway, gateway.key, 10)))
                await asyncio.sleep(0.05)
            return await asyncio.gather(*streams)

        statuses = asyncio.run(twenty_four_streams())
        stats = simulator.stats()
        log = gateway.log_text()
        served_by = workers_that_answered(gateway)

    assert statuses == [200] * 24
    assert stats["completed"] == 24
    assert stats["peak_running"] == 4  # one worker alone would have sent 4, two 8
    assert served_by == 2, "the kernel gave every connection to one worker; the test proves nothing"
    lines = [line for line in log.splitlines() if " access " in line and CHAT in line]
    assert len(lines) == 24
    assert 4 <= sum("queue_ms=" not in line for line in lines) < 24


@pytest.mark.parametrize("rate_limits_apart", [False, True], ids=["one-redis", "rate-limits-apart"])
def test_gateway_redis_url_is_the_redis_two_workers_share_admission_through(
    tmp_path: Path, simulator: Simulator, redis_url: str, rate_limits_apart: bool
) -> None:
    """GATEWAY_REDIS_URL alone is enough for two workers: admission's counts and queues go there, and
    the rate limits' too unless GATEWAY_RATE_LIMIT_STORAGE names a store of its own. Each setting names
    a database of its own here, so that each count shows where it went."""
    server = redis_url.rpartition("/")[0]
    env = {"GATEWAY_WORKERS": "2", "GATEWAY_REDIS_URL": f"{server}/2"}
    if rate_limits_apart:
        env["GATEWAY_RATE_LIMIT_STORAGE"] = f"{server}/1"
    backend = Backend("sim", simulator.base_url, path="/models/sim", max_num_seqs="2")
    with Gateway.start(tmp_path / "gw", [backend], env=env) as gateway:

        async def twelve_streams() -> list[int]:
            streams = []
            for _ in range(12):  # a little apart, so that both workers take some; half a second each
                streams.append(asyncio.create_task(stream_through(gateway, gateway.key, 10)))
                await asyncio.sleep(0.05)
            return await asyncio.gather(*streams)

        statuses = asyncio.run(twelve_streams())
        stats = simulator.stats()
        served_by = workers_that_answered(gateway)
        keys = {db: [name.decode() for name in redis.Redis.from_url(f"{server}/{db}").scan_iter()] for db in (0, 1, 2)}

    assert statuses == [200] * 12
    assert stats["peak_running"] == 2  # one worker alone would have sent 2, two 4
    assert served_by == 2, "the kernel gave every connection to one worker; the test proves nothing"
    admission = {db for db, names in keys.items() if any(n.startswith("vllm_gateway:admission:") for n in names)}
    rate_limits = {db for db, names in keys.items() if any(n.startswith("LIMITS:") for n in names)}
    assert admission == {2}
    assert rate_limits == ({1} if rate_limits_apart else {2})
    assert keys[0] == []


# Rounds of the weights test, for one in which both workers took connections: one round in six went
# to one worker alone here, so all four do in under one run in a thousand.
ROUNDS_FOR_BOTH_WORKERS = 4


def test_across_workers_admission_follows_the_keys_weights(
    tmp_path: Path, simulator: Simulator, redis_url: str
) -> None:
    with start_two_workers(tmp_path, simulator, redis_url, max_num_seqs="1") as gateway:
        light = str(gateway.create_key("--name", "light")["key"])
        heavy = str(gateway.create_key("--name", "heavy", "--weight", "2")["key"])
        gateway.wait_for_key(light)
        gateway.wait_for_key(heavy)
        order: list[str] = []

        async def one(name: str, key: str) -> int:
            async with fresh_client(gateway) as client:
                headers = {"Authorization": f"Bearer {key}"}
                response = await client.post(CHAT, json=chat(2, stream=False), headers=headers)
                order.append(name)
                return response.status_code

        store = redis.Redis.from_url(redis_url, socket_timeout=5)

        async def until_waiting(count: int) -> None:
            # Redis's own count, exact: /health's is as of the last heartbeat, a second old.
            for _ in range(200):
                if admission_figure(store, "q:sim:size") >= count:
                    return
                await asyncio.sleep(0.05)
            raise TimeoutError(f"{count} requests never waited at once")

        async def scenario() -> list[int]:
            blocker = asyncio.create_task(stream_through(gateway, gateway.key, 1000))  # holds the one slot
            while simulator.stats()["running"] < 1:
                await asyncio.sleep(0.05)
            # One connection at a time, so that both workers get some (a burst goes to one, whose
            # loop accepts the whole backlog).
            tasks = []
            for name, key in [("A", light)] * 6 + [("B", heavy)] * 6:
                tasks.append(asyncio.create_task(one(name, key)))
                await until_waiting(len(tasks))
            blocker.cancel()  # its client leaves: the slot goes to the queue, in turn
            return await asyncio.gather(*tasks)

        # Which worker accepts a connection is the kernel's choice, and now and then it gave all twelve
        # to one worker, which proves nothing about two. So the rounds go on until one of them had
        # requests on both workers; every round keeps the one order all the same.
        counted = [0.0, 0.0]
        for _ in range(ROUNDS_FOR_BOTH_WORKERS):
            order.clear()
            statuses = asyncio.run(scenario())
            assert statuses == [200] * 12
            # One queue for the whole gateway: A's turn sends one, B's turn two, until B has none left.
            assert "".join(order) == "ABBABBABBAAA"

            def settled(total: float = sum(counted) + 12) -> list[float] | None:
                counts = gateway.requests_by_worker("sim", {"light", "heavy"})
                return counts if sum(counts) >= total else None

            now = wait_until(settled)
            if all(after > before for after, before in zip(now, counted, strict=True)):
                break
            counted = now
        else:
            raise AssertionError(f"in {ROUNDS_FOR_BOTH_WORKERS} rounds, every connection of each went to one worker")


def test_across_workers_a_queued_request_whose_client_leaves_never_reaches_the_backend(
    tmp_path: Path, simulator: Simulator, redis_url: str
) -> None:
    with start_two_workers(tmp_path, simulator, redis_url, max_num_seqs="1") as gateway:

        async def until(check: Callable[[], bool]) -> None:
            for _ in range(300):
                if check():
                    return
                await asyncio.sleep(0.1)
            raise TimeoutError("the gateway's waiting count never got there")

        store = redis.Redis.from_url(redis_url)

        def queued_in_redis() -> int:
            """The model's queue as Redis holds it, exact (the /health count may be a second old)."""
            return sum(int(store.get(name) or 0) for name in store.scan_iter("vllm_gateway:admission:*:q:sim:size"))

        async def scenario() -> list[int]:
            blocker = asyncio.create_task(stream_through(gateway, gateway.key, 1000))  # holds the one slot
            await until(lambda: simulator.stats()["running"] == 1)
            # Four clients wait, on whichever workers took their connections, then leave.
            for _ in range(4):
                with socket.create_connection(("127.0.0.1", gateway.port)) as queued:
                    queued.sendall(raw_post(gateway.key, chat(5)))
                    await until(lambda: queued_in_redis() == 1)
                await until(lambda: queued_in_redis() == 0)
            blocker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await blocker
            await until(lambda: simulator.stats()["running"] == 0)
            return [await stream_through(gateway, gateway.key, 2) for _ in range(2)]

        after = asyncio.run(scenario())
        stats = simulator.stats()

    assert after == [200, 200]
    # The blocker and the two after it; none of the four that left.
    assert stats["requests"][CHAT] == 3
    assert stats["peak_running"] == 1


@pytest.fixture
def restartable_redis(tmp_path: Path):
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


def admission_figure(store: redis.Redis, suffix: str, field: str | None = None) -> int:
    """One of admission's counts as Redis holds it (`q:sim:size`, `inflight:sim` with `total`)."""
    total = 0
    for name in store.scan_iter(f"vllm_gateway:admission:*:{suffix}"):
        total += int((store.hget(name, field) if field else store.get(name)) or 0)
    return total


async def post(gateway: Gateway, body: dict[str, object], timeout: float = 60) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=timeout, verify=client_tls()) as client:
        return await client.post(CHAT, json=body, headers={"Authorization": f"Bearer {gateway.key}"})


def test_while_redis_is_away_requests_get_503_store_unavailable_and_once_it_is_back_all_is_as_before(
    tmp_path: Path, simulator: Simulator, restartable_redis: Redis
) -> None:
    """Redis restarts empty under a running gateway: a request that waits, and any request while it is
    away, gets 503 store_unavailable at once; once it is back, the slot of a stream that went on
    throughout is counted again, and no request fails on a connection from before the restart."""
    env = {"GATEWAY_QUEUE_TIMEOUT": "120"}
    with start_two_workers(tmp_path, simulator, restartable_redis.url, env, max_num_seqs="1") as gateway:
        store = redis.Redis.from_url(restartable_redis.url, socket_timeout=5)

        def queued() -> int:
            return admission_figure(store, "q:sim:size")

        async def burst(count: int) -> list[httpx.Response]:
            return await asyncio.gather(*(post(gateway, chat(2, stream=False)) for _ in range(count)))

        async def scenario() -> dict[str, object]:
            before = await burst(30)  # both workers' connections to Redis, many of them
            blocker = asyncio.create_task(stream_through(gateway, gateway.key, 2000))  # holds the one slot throughout
            await wait_until_async(lambda: simulator.stats()["running"] == 1)
            waiting = asyncio.create_task(post(gateway, chat(2, stream=False), timeout=30))
            await wait_until_async(lambda: queued() == 1)

            restartable_redis.stop()
            dropped = await waiting  # long before the queue timeout of 120 s
            while_away = await burst(6)
            restartable_redis.start()  # empty: no counts, no queue, no scripts

            # The blocker's worker tells the new Redis of the slot it holds.
            await wait_until_async(lambda: admission_figure(store, "inflight:sim", "total") == 1)
            after = asyncio.create_task(post(gateway, chat(2, stream=False)))
            await wait_until_async(lambda: queued() == 1)  # so it waits: the slot is taken
            blocker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await blocker
            return {
                "before": before,
                "dropped": dropped,
                "while_away": while_away,
                "after": await after,
                "then": await burst(40),
            }

        result = asyncio.run(scenario())
        stats = simulator.stats()

    assert [response.status_code for response in result["before"]] == [200] * 30  # type: ignore[attr-defined]
    for refused in [result["dropped"], *result["while_away"]]:  # type: ignore[list-item]
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "store_unavailable")
        assert "Redis" in error["message"]
    assert "place in the queue" in result["dropped"].json()["error"]["message"]  # type: ignore[attr-defined]
    assert result["after"].status_code == 200  # type: ignore[attr-defined]
    assert [response.status_code for response in result["then"]] == [200] * 40  # type: ignore[attr-defined]
    assert stats["peak_running"] == 1


def test_a_redis_that_stops_answering_gets_503_store_unavailable_within_the_redis_timeout(
    tmp_path: Path, simulator: Simulator, restartable_redis: Redis
) -> None:
    """A Redis that accepts connections and answers nothing (paused here; a lost network alike):
    requests, and one that waits, get 503 store_unavailable after GATEWAY_REDIS_TIMEOUT, not never."""
    env = {"GATEWAY_QUEUE_TIMEOUT": "120", "GATEWAY_REDIS_TIMEOUT": "1"}
    with start_two_workers(tmp_path, simulator, restartable_redis.url, env, max_num_seqs="1") as gateway:
        store = redis.Redis.from_url(restartable_redis.url, socket_timeout=5)

        async def scenario() -> tuple[httpx.Response, list[httpx.Response], list[httpx.Response]]:
            blocker = asyncio.create_task(stream_through(gateway, gateway.key, 2000))  # holds the one slot
            await wait_until_async(lambda: simulator.stats()["running"] == 1)
            waiting = asyncio.create_task(post(gateway, chat(2, stream=False), timeout=30))
            await wait_until_async(lambda: admission_figure(store, "q:sim:size") == 1)
            restartable_redis.pause()
            try:
                dropped = await waiting
                silent = await asyncio.gather(*(post(gateway, chat(2, stream=False), timeout=30) for _ in range(4)))
            finally:
                restartable_redis.resume()
            blocker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await blocker
            await wait_until_async(lambda: simulator.stats()["running"] == 0)
            back = await asyncio.gather(*(post(gateway, chat(2, stream=False)) for _ in range(10)))
            return dropped, silent, back

        dropped, silent, back = asyncio.run(scenario())
        stats = simulator.stats()

    for refused in [dropped, *silent]:
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "store_unavailable"
    assert [response.status_code for response in back] == [200] * 10
    assert stats["peak_running"] == 1


def worker_serving(gateway: Gateway, client: socket.socket) -> int:
    """The pid of the worker that accepted `client`'s connection (from /proc: the socket whose peer
    is the client's port, and the process that holds it)."""
    port = client.getsockname()[1]

    def holder() -> int:
        inodes = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1].split(":"), fields[2].split(":")
            if int(local[1], 16) == gateway.port and int(remote[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
        for pid in gateway.handle.tree():
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) in inodes:
                            return pid
        return 0

    return int(wait_until(holder, timeout=10))


def test_a_killed_workers_slot_goes_at_once_to_a_request_waiting_on_the_other(
    tmp_path: Path, simulator: Simulator, redis_url: str
) -> None:
    """kill -9 of the worker relaying a long stream: once it is taken for dead (its heartbeat key
    expires, 10 s), its slot goes to the request waiting on the other worker, without waiting for
    another request to end (none would, here, before the queue timeout)."""
    env = {"GATEWAY_QUEUE_TIMEOUT": "120"}
    with start_two_workers(tmp_path, simulator, redis_url, env, max_num_seqs="1") as gateway:
        store = redis.Redis.from_url(redis_url, socket_timeout=5)
        opened: list[socket.socket] = []
        try:
            blocker = socket.create_connection(("127.0.0.1", gateway.port))
            opened.append(blocker)
            blocker.sendall(raw_post(gateway.key, chat(2000)))  # a stream of 100 s
            wait_until(lambda: simulator.stats()["running"] == 1)
            doomed = worker_serving(gateway, blocker)
            # Requests on connections of their own, until one waits on the other worker.
            waiting = None
            for count in range(1, 21):
                client = socket.create_connection(("127.0.0.1", gateway.port))
                opened.append(client)
                client.sendall(raw_post(gateway.key, chat(2, stream=False)))
                wait_until(lambda count=count: admission_figure(store, "q:sim:size") == count)
                if worker_serving(gateway, client) != doomed:
                    waiting = client
                    break
            assert waiting is not None, "the kernel gave every connection to one worker"

            os.kill(doomed, signal.SIGKILL)
            waiting.settimeout(40)  # the reap takes 10 s; the stream had 100 s to go, the queue 120 s
            status, _, body = Reader(waiting).response()
        finally:
            for client in opened:
                client.close()

    assert status == 200
    assert json.loads(body)["usage"]["completion_tokens"] == 2
