"""Admission's Redis side (admission/shared.py), two workers in one process against a real Redis:
the turns it keeps are one worker's deficit round robin step for step, and a worker that dies gives
back what it held."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from vllm_gateway.admission.local import ModelQueue, Waiter
from vllm_gateway.admission.shared import SharedAdmission
from vllm_gateway.key_limits import KeyLimits, limits_of
from vllm_gateway.keystore import KeyRecord
from vllm_gateway.model_config import BackendSpec
from vllm_gateway.registry import BackendState, Model, Registry
from vllm_gateway.settings import Settings

SPEC = BackendSpec(id="m-1", name="m", aliases=(), path="", base_url="http://127.0.0.1:9", api_key=None, max_num_seqs=1)


def key(name: str, weight: float) -> KeyLimits:
    """Key `name` as admission sees it (key_limits.py)."""
    record = KeyRecord(id=f"key_{name}", name=name, prefix="sk-", hash="-", weight=weight, created_at=time.time())
    return limits_of(record, Settings())


def worker(redis_url: str, tmp_path: Path) -> SharedAdmission:
    settings = Settings(workers=2, rate_limit_storage=redis_url, key_file=tmp_path / "api_keys.json", port=1)
    registry = Registry([SPEC])
    for backend in registry.backends():
        backend.state = BackendState.READY
    return SharedAdmission(settings, registry)


Workers = tuple[SharedAdmission, SharedAdmission]


@contextlib.asynccontextmanager
async def two_workers(redis_url: str, tmp_path: Path) -> AsyncIterator[Workers]:
    first, second = worker(redis_url, tmp_path), worker(redis_url, tmp_path)
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.stop()
        await second.stop()


@pytest.fixture
def run_with_workers(redis_url: str, tmp_path: Path) -> Callable[[Callable[[Workers], Awaitable[None]]], None]:
    def run(scenario: Callable[[Workers], Awaitable[None]]) -> None:
        async def main() -> None:
            async with two_workers(redis_url, tmp_path) as workers:
                await scenario(workers)

        asyncio.run(main())

    return run


def model_of(admission: SharedAdmission) -> Model:
    return admission.registry.models["m"]


async def until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def one_workers_order(queued: list[tuple[str, float]]) -> list[str]:
    queue = ModelQueue(Model("m", ""))
    loop = asyncio.get_running_loop()
    for name, weight in queued:
        queue.push(Waiter(name, loop.create_future()), weight)
    order = []
    while (waiter := queue.pop()) is not None:
        order.append(waiter.key_id)
    return order


WHOLE_WEIGHTS = (0.5, 1.0, 2.0, 3.0)
# Weights far below one, which need many turns to send a request (counted, not taken: next_turn).
SMALL_WEIGHTS = (0.01, 0.07, 0.3, 1.3)


@pytest.mark.parametrize(
    ("seed", "weights"), [(1, WHOLE_WEIGHTS), (2, WHOLE_WEIGHTS), (3, SMALL_WEIGHTS), (4, SMALL_WEIGHTS)]
)
def test_the_turns_across_workers_are_one_workers_deficit_round_robin(  # type: ignore[no-untyped-def]
    run_with_workers, seed: int, weights: tuple[float, ...]
) -> None:
    run_with_workers(lambda workers: turns_across_workers(workers, seed, weights))


async def turns_across_workers(workers: Workers, seed: int, weights: tuple[float, ...]) -> None:
    rng = random.Random(seed)
    keys = [key(name, rng.choice(weights)) for name in "ABCD"]
    queued = [(rng.choice(keys), rng.choice(workers)) for _ in range(30)]
    holder = workers[0]
    slot, _ = await holder.acquire(model_of(holder), keys[0])
    assert slot is not None
    order: list[str] = []

    async def request(record: KeyLimits, admission: SharedAdmission) -> None:
        backend, waited = await admission.acquire(model_of(admission), record)
        assert backend is not None and waited > 0
        order.append(record.id)
        admission.release(backend)  # the next in turn goes, on whichever worker it waits

    tasks = []
    for record, admission in queued:
        before = admission.waiting("m")
        tasks.append(asyncio.create_task(request(record, admission)))
        await until(lambda admission=admission, before=before: admission.waiting("m") == before + 1)
    assert {id(admission) for _, admission in queued} == {id(workers[0]), id(workers[1])}
    holder.release(slot)
    await asyncio.wait_for(asyncio.gather(*tasks), 20)

    assert order == one_workers_order([(record.id, record.weight) for record, _ in queued])


def test_a_tiny_weight_never_keeps_redis_busy(redis_url: str, tmp_path: Path) -> None:
    """A weight below the minimum (as a key file written before it may hold) admits its request
    at once when that key alone waits; turn by turn, the script would run for ever inside Redis."""
    import redis

    async def scenario() -> None:
        async with two_workers(redis_url, tmp_path) as (holder, waiting_on):
            tiny = dataclasses.replace(key("T", 1.0), weight=1e-300)  # past the key record's minimum
            slot, _ = await holder.acquire(model_of(holder), key("A", 1))
            assert slot is not None
            waiting = asyncio.create_task(waiting_on.acquire(model_of(waiting_on), tiny))
            await until(lambda: waiting_on.waiting("m") == 1)
            holder.release(slot)  # Redis's dispatch hands the slot to T, whose credit is 1e-300 a turn
            backend, waited = await asyncio.wait_for(waiting, 5)
            assert backend is not None and waited > 0
            assert redis.Redis.from_url(redis_url, socket_timeout=2).ping()
            waiting_on.release(backend)

    asyncio.run(asyncio.wait_for(scenario(), 30))  # a Redis stuck in a script would hang the cleanup


def test_a_dead_workers_slots_and_tickets_are_reaped(run_with_workers) -> None:  # type: ignore[no-untyped-def]
    run_with_workers(a_worker_dies)


async def a_worker_dies(workers: Workers) -> None:
    dead, alive = workers
    slot, _ = await dead.acquire(model_of(dead), key("A", 1))
    assert slot is not None
    waiting = asyncio.create_task(dead.acquire(model_of(dead), key("B", 1)))
    await until(lambda: dead.waiting("m") == 1)
    # The worker dies: it beats no more, and its alive key expires (deleted here, not waited for).
    for task in dead.tasks:
        task.cancel()
    await alive.redis.delete(f"{dead.prefix}:alive:{dead.worker}")

    await alive.heartbeat()  # which reaps

    assert alive.totals == {"m": 0}  # the dead worker's ticket left the queue
    backend, waited = await asyncio.wait_for(alive.acquire(model_of(alive), key("C", 1)), 5)
    assert backend is not None and waited == 0.0  # its slot came back at once
    assert not waiting.done()  # a dead worker's request is never handed a slot
    waiting.cancel()


def test_a_request_that_gives_up_leaves_the_queue_and_hands_on_a_slot_granted_meanwhile(run_with_workers) -> None:  # type: ignore[no-untyped-def]
    run_with_workers(one_gives_up)


async def one_gives_up(workers: Workers) -> None:
    first, second = workers
    slot, _ = await first.acquire(model_of(first), key("A", 1))
    assert slot is not None
    leaving = asyncio.create_task(second.acquire(model_of(second), key("B", 1)))
    await until(lambda: second.waiting("m") == 1)
    staying = asyncio.create_task(first.acquire(model_of(first), key("C", 1)))
    await until(lambda: first.waiting("m") == 1)

    leaving.cancel()
    first.release(slot)  # at the same moment: either the cancel or the grant comes first in Redis

    backend, waited = await asyncio.wait_for(staying, 5)
    assert backend is not None and waited > 0
    assert leaving.cancelled()
    await first.heartbeat()
    assert first.totals == {"m": 0}
    inflight = await first.redis.hget(f"{first.prefix}:inflight:m-1", "total")
    assert int(inflight) == 1  # C's, and no slot left held for B


def test_without_redis_a_request_gets_503_store_unavailable_and_holds_nothing(tmp_path: Path) -> None:
    from tests.support.redis_server import Redis
    from vllm_gateway.errors import GatewayError

    server = Redis(tmp_path)
    server.start()

    async def scenario() -> tuple[GatewayError, int]:
        admission = worker(server.url, tmp_path)
        await admission.start()
        server.stop()
        try:
            await admission.acquire(model_of(admission), key("A", 1))
        except GatewayError as error:
            refused = error
        else:
            raise AssertionError("admitted without Redis")
        in_flight = model_of(admission).backends[0].in_flight
        await admission.stop()
        return refused, in_flight

    try:
        refused, in_flight = asyncio.run(scenario())
    finally:
        server.stop()
    assert (refused.status, refused.code) == (503, "store_unavailable")
    assert refused.headers == [(b"retry-after", b"1")]
    assert in_flight == 0


def test_scripts_that_redis_forgot_are_loaded_again_without_refusing_a_request(run_with_workers) -> None:  # type: ignore[no-untyped-def]
    run_with_workers(scripts_flushed)


async def scripts_flushed(workers: Workers) -> None:
    first, _ = workers
    await first.redis.script_flush()  # as an operator's SCRIPT FLUSH, on the same connection's Redis
    backend, waited = await asyncio.wait_for(first.acquire(model_of(first), key("A", 1)), 5)
    assert backend is not None and waited == 0.0
    first.release(backend)


def test_a_request_waiting_on_another_worker_gets_model_not_ready_when_its_server_starts_loading(  # type: ignore[no-untyped-def]
    run_with_workers,
) -> None:
    run_with_workers(server_starts_loading)


async def server_starts_loading(workers: Workers) -> None:
    from vllm_gateway.errors import GatewayError

    first, second = workers
    slot, _ = await first.acquire(model_of(first), key("A", 1))
    assert slot is not None
    waiting = asyncio.create_task(second.acquire(model_of(second), key("B", 1)))
    await until(lambda: second.waiting("m") == 1)

    model_of(second).backends[0].mark(BackendState.LOADING, "restarting")
    second.backends_changed()

    with pytest.raises(GatewayError) as refused:
        await asyncio.wait_for(waiting, 5)
    assert (refused.value.status, refused.value.code) == (503, "model_not_ready")
    assert refused.value.message == "The model `m` has no ready server right now (loading). Try again in 10 s."
    assert refused.value.headers == [(b"retry-after", b"10")]
    first.release(slot)
