"""Admission's Redis side (admission/shared.py), two workers in one process against a real Redis:
the turns it keeps are one worker's deficit round robin step for step, a worker that dies gives
back what it held, and no slot is lost or counted twice when Redis fails under the workers (refuses,
pauses, stops, drops a connection) at any step of a request."""

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
from vllm_gateway.registry import Backend, BackendState, Model, Registry
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


# ---- Redis failing under running workers --------------------------------------------------------


def one_worker(redis_url: str, tmp_path: Path, spec: BackendSpec = SPEC, **settings: object) -> SharedAdmission:
    """A worker of `spec`'s model with settings of the test's own (worker() has the defaults)."""
    config = Settings(workers=2, rate_limit_storage=redis_url, key_file=tmp_path / "api_keys.json", port=1, **settings)
    registry = Registry([spec])
    for backend in registry.backends():
        backend.state = BackendState.READY
    return SharedAdmission(config, registry)


async def hold_the_slot_with_one_waiting(
    holder: SharedAdmission, waiting_on: SharedAdmission
) -> tuple[Backend, asyncio.Task[tuple[Backend | None, float]]]:
    """`holder` takes the model's one slot; a request on `waiting_on` queues for it."""
    slot, _ = await holder.acquire(model_of(holder), key("A", 1))
    assert slot is not None
    waiting = asyncio.create_task(waiting_on.acquire(model_of(waiting_on), key("B", 1)))
    await until(lambda: waiting_on.waiting("m") == 1)
    return slot, waiting


async def given_to_the_one_waiting(
    redis_url: str,
    holder: SharedAdmission,
    waiting_on: SharedAdmission,
    waiting: asyncio.Task[tuple[Backend | None, float]],
) -> None:
    """The slot `holder` gave back went to the request waiting on `waiting_on` (hold_the_slot_with_one_waiting),
    and Redis counts it there and nowhere else; that request then ends too."""
    backend, waited = await asyncio.wait_for(waiting, 5)
    assert backend is not None and waited > 0
    assert in_redis(redis_url, "inflight:m-1", holder.worker) == 0
    assert in_redis(redis_url, "inflight:m-1", "total") == 1  # the waiting request's
    waiting_on.release(backend)


@contextlib.asynccontextmanager
async def started(*workers: SharedAdmission) -> AsyncIterator[None]:
    for admission in workers:
        await admission.start()
    try:
        yield
    finally:
        for admission in workers:
            await admission.stop()


def in_redis(redis_url: str, name: str, field: str | None = None) -> int:
    """One of admission's figures as Redis holds it now (`inflight:m-1` with a field, `q:m:size`),
    read on a connection of its own (Redis may have restarted since the workers connected)."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        names = list(client.scan_iter(f"vllm_gateway:admission:*:{name}"))
        return sum(int((client.hget(n, field) if field else client.get(n)) or 0) for n in names)
    finally:
        client.close()


async def until_redis(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """until(), for a check that asks Redis (a blocking call): polled without holding up the loop for long."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "Redis never got there"
        await asyncio.sleep(0.05)


def test_a_release_redis_refuses_is_sent_again_once_it_answers(redis, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Redis refuses the release of a slot with an error (out of memory here): the slot is not lost,
    the worker sends the release again after a heartbeat Redis answers, and the request waiting on
    the other worker gets it."""
    import redis as redis_py

    from vllm_gateway.errors import GatewayError

    async def scenario() -> None:
        holder, waiting_on = one_worker(redis.url, tmp_path), one_worker(redis.url, tmp_path)
        async with started(holder, waiting_on):
            slot, waiting = await hold_the_slot_with_one_waiting(holder, waiting_on)
            admin = redis_py.asyncio.Redis.from_url(redis.url)
            await admin.config_set("maxmemory", 1)  # every script that writes is refused: OOM
            try:
                holder.release(slot)
                await until(lambda: holder.unreleased != [])  # refused, and kept to send again
                with pytest.raises(GatewayError) as refused:  # and a new request is refused at once
                    await waiting_on.acquire(model_of(waiting_on), key("C", 1))
                assert (refused.value.status, refused.value.code) == (503, "store_unavailable")
                assert waiting_on.waiting("m") == 1 and model_of(waiting_on).backends[0].in_flight == 0
                await asyncio.sleep(1.5)  # heartbeats come and are refused too
                assert not waiting.done()
                assert in_redis(redis.url, "inflight:m-1", "total") == 1
            finally:
                await admin.config_set("maxmemory", 0)
                await admin.aclose()
            backend, waited = await asyncio.wait_for(waiting, 5)
            assert backend is not None and waited > 0
            assert holder.unreleased == []
            assert holder.outage.since is None  # the heartbeat that got through ended the outage
            assert in_redis(redis.url, "inflight:m-1", "total") == 1  # B's; A's given back once
            waiting_on.release(backend)

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("slot_free", [True, False], ids=["redis-admits-it", "redis-queues-it"])
def test_a_request_cancelled_while_redis_decides_gives_back_what_redis_decided(  # type: ignore[no-untyped-def]
    redis, tmp_path: Path, slot_free: bool
) -> None:
    """The client leaves while Redis (paused here) has not answered the request's acquire: once it
    answers, the slot it gave is given back, or the ticket it queued leaves the queue."""

    async def scenario() -> None:
        first, second = one_worker(redis.url, tmp_path), one_worker(redis.url, tmp_path)
        async with started(first, second):
            held = None
            if not slot_free:
                held, _ = await first.acquire(model_of(first), key("A", 1))
                assert held is not None
            redis.pause()
            try:
                deciding = asyncio.create_task(second.acquire(model_of(second), key("B", 1)))
                await asyncio.sleep(0.1)  # its script is on its way; Redis says nothing
                deciding.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await deciding
            finally:
                redis.resume()
            await second.pipe.call("PING")  # after the acquire's answer: what undoes it has started
            await asyncio.gather(*second.pending)
            assert in_redis(redis.url, "q:m:size") == 0
            assert in_redis(redis.url, "inflight:m-1", "total") == (0 if slot_free else 1)
            assert model_of(second).backends[0].in_flight == 0
            if held is not None:
                first.release(held)  # to nobody: the ticket left
            backend, waited = await asyncio.wait_for(first.acquire(model_of(first), key("C", 1)), 5)
            assert backend is not None and waited == 0.0  # the slot is free at once
            first.release(backend)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_request_that_ends_while_its_worker_joins_is_given_back_once_joined(redis, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A worker's connection drops and its next one joins (counting the slot it holds); the request
    ends while Redis runs the join (held up by CLIENT PAUSE): its slot is given back once joined,
    and goes to the request waiting on the other worker."""
    import redis as redis_py

    async def scenario() -> None:
        holder, waiting_on = one_worker(redis.url, tmp_path), one_worker(redis.url, tmp_path)
        async with started(holder, waiting_on):
            slot, waiting = await hold_the_slot_with_one_waiting(holder, waiting_on)
            admin = redis_py.asyncio.Redis.from_url(redis.url)
            await admin.execute_command("CLIENT", "PAUSE", 5000, "WRITE")  # scripts wait; SCRIPT LOAD does not
            try:
                holder.pipe.abort()  # a network blip: the heartbeat connects again, and joins
                await until(lambda: holder.released_while_joining is not None)
                holder.release(slot)
            finally:
                await admin.execute_command("CLIENT", "UNPAUSE")
                await admin.aclose()
            await given_to_the_one_waiting(redis.url, holder, waiting_on, waiting)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_request_that_ends_as_its_workers_join_is_answered_is_given_back(redis, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The request ends after Redis answered its worker's join (which counted its slot) and before the
    new connection is in use, a turn of the loop or more on a busy machine: its slot is given back all
    the same, and goes to the request waiting on the other worker. (It was lost: Redis kept the slot
    taken until the worker's next connection, and every later request queued behind it.)"""

    async def scenario() -> None:
        holder, waiting_on = one_worker(redis.url, tmp_path), one_worker(redis.url, tmp_path)
        async with started(holder, waiting_on):
            slot, waiting = await hold_the_slot_with_one_waiting(holder, waiting_on)
            join = holder.pipe.prepare
            assert join is not None

            async def join_then_end(call: Callable[..., Awaitable[object]]) -> None:
                await join(call)
                holder.release(slot)  # the stream ends as the join's answer is read

            holder.pipe.prepare = join_then_end
            holder.pipe.abort()  # a network blip: the heartbeat connects again, and joins
            await given_to_the_one_waiting(redis.url, holder, waiting_on, waiting)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_redis_going_again_as_a_worker_joins_leaves_the_next_join_counting_what_it_holds_then(  # type: ignore[no-untyped-def]
    redis, tmp_path: Path
) -> None:
    """A worker holding two slots joins again after its connection dropped; one of its requests ends
    while Redis runs the join, and Redis stops as it answers. The Redis that comes back (empty) is
    told of the one slot still held: the one given back is counted neither twice nor never."""
    import redis as redis_py

    two = dataclasses.replace(SPEC, max_num_seqs=2)

    async def scenario() -> None:
        holder = one_worker(redis.url, tmp_path, two)
        async with started(holder):
            ending, staying = [(await holder.acquire(model_of(holder), key(name, 1)))[0] for name in "AB"]
            assert ending is not None and staying is not None
            admin = redis_py.Redis.from_url(redis.url)  # blocking: the worker reads nothing meanwhile
            admin.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
            holder.pipe.abort()
            await until(lambda: holder.released_while_joining is not None)
            holder.release(ending)
            # Redis answers the join and stops before the worker reads the answer (the loop is held).
            admin.execute_command("CLIENT", "UNPAUSE")
            admin.close()
            time.sleep(0.1)
            redis.stop()
            await asyncio.sleep(0.5)  # the worker finds it gone, and tries again meanwhile
            redis.start()
            await until_redis(lambda: in_redis(redis.url, "inflight:m-1", "total") == 1)
            await asyncio.sleep(1.2)  # a heartbeat, and any release that would still come
            assert in_redis(redis.url, "inflight:m-1", "total") == 1
            assert in_redis(redis.url, "inflight:m-1", holder.worker) == 1
            holder.release(staying)
            await until_redis(lambda: in_redis(redis.url, "inflight:m-1", "total") == 0)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_request_waiting_past_the_queue_timeout_gets_503_and_leaves_the_redis_queue(
    redis_url: str, tmp_path: Path
) -> None:
    from vllm_gateway.errors import GatewayError

    async def scenario() -> None:
        first, second = one_worker(redis_url, tmp_path), one_worker(redis_url, tmp_path, queue_timeout=0.3)
        async with started(first, second):
            held, _ = await first.acquire(model_of(first), key("A", 1))
            assert held is not None
            with pytest.raises(GatewayError) as refused:
                await asyncio.wait_for(second.acquire(model_of(second), key("B", 1)), 5)
            assert (refused.value.status, refused.value.code) == (503, "queue_timeout")
            assert in_redis(redis_url, "q:m:size") == 0
            first.release(held)
            backend, waited = await asyncio.wait_for(first.acquire(model_of(first), key("C", 1)), 5)
            assert backend is not None and waited == 0.0  # the slot went to nobody who left
            first.release(backend)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_request_past_the_queue_limit_of_the_whole_gateway_gets_503_queue_full(
    redis_url: str, tmp_path: Path
) -> None:
    """GATEWAY_QUEUE_LIMIT counts the requests waiting on every worker: one waits on the first, so the
    second worker refuses the next."""
    from vllm_gateway.errors import GatewayError

    async def scenario() -> None:
        first, second = (one_worker(redis_url, tmp_path, queue_limit=1) for _ in range(2))
        async with started(first, second):
            held, _ = await first.acquire(model_of(first), key("A", 1))
            assert held is not None
            waiting = asyncio.create_task(first.acquire(model_of(first), key("B", 1)))
            await until(lambda: first.waiting("m") == 1)
            with pytest.raises(GatewayError) as refused:
                await asyncio.wait_for(second.acquire(model_of(second), key("C", 1)), 5)
            assert (refused.value.status, refused.value.code) == (503, "queue_full")
            assert second.waiting("m") == 0 and in_redis(redis_url, "q:m:size") == 1
            first.release(held)
            backend, waited = await asyncio.wait_for(waiting, 5)
            assert backend is not None and waited > 0
            first.release(backend)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_request_that_comes_while_its_worker_is_not_connected_connects_joins_and_is_admitted(
    redis_url: str, tmp_path: Path
) -> None:
    """The first request after a dropped connection makes the new one itself (joining first, with the
    slot the worker still holds), rather than being refused."""
    two = dataclasses.replace(SPEC, max_num_seqs=2)

    async def scenario() -> None:
        admission = one_worker(redis_url, tmp_path, two)
        async with started(admission):
            held, _ = await admission.acquire(model_of(admission), key("A", 1))
            assert held is not None
            admission.pipe.abort()
            await until(lambda: not admission.pipe.connected)
            backend, waited = await asyncio.wait_for(admission.acquire(model_of(admission), key("B", 1)), 5)
            assert backend is not None and waited == 0.0
            assert in_redis(redis_url, "inflight:m-1", "total") == 2  # the one held, counted once, and B's
            admission.release(held)
            admission.release(backend)
            await until_redis(lambda: in_redis(redis_url, "inflight:m-1", "total") == 0)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_request_that_takes_no_sequence_is_counted_neither_in_redis_nor_by_a_join(
    redis_url: str, tmp_path: Path
) -> None:
    """/tokenize and /detokenize go at once, full server or not (proxy.NO_SEQUENCE_PATHS): Redis does
    not count them, and a new connection's join, which tells Redis what the worker holds, leaves
    them out too, or a server's slot would stay taken by them."""

    async def scenario() -> None:
        admission = one_worker(redis_url, tmp_path)
        async with started(admission):
            model = model_of(admission)
            tokenizing, waited = await admission.acquire(model, key("A", 1), at_once=True)
            assert tokenizing is not None and waited == 0.0 and tokenizing.in_flight == 1
            assert in_redis(redis_url, "inflight:m-1", "total") == 0
            generation = admission.pipe.generation
            admission.pipe.abort()
            await until(lambda: admission.pipe.generation > generation and admission.pipe.connected)
            await admission.heartbeat()  # after the join
            assert in_redis(redis_url, "inflight:m-1", "total") == 0
            backend, waited = await asyncio.wait_for(admission.acquire(model, key("B", 1)), 5)
            assert backend is not None and waited == 0.0  # the one slot was free
            admission.release(tokenizing, at_once=True)
            admission.release(backend)
            assert tokenizing.in_flight == 0 and admission.uncounted == {"m-1": 0}

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_slot_granted_while_a_workers_channel_was_lost_is_taken_up_when_it_subscribes_again(
    redis_url: str, tmp_path: Path
) -> None:
    """The grant is published while the waiting request's worker is not subscribed (its channel's
    connection was killed): the granted hash keeps it, and the worker reads it on subscribing again."""
    import redis as redis_py

    async def scenario() -> None:
        holder, waiting_on = one_worker(redis_url, tmp_path), one_worker(redis_url, tmp_path)
        async with started(holder, waiting_on):
            slot, waiting = await hold_the_slot_with_one_waiting(holder, waiting_on)
            admin = redis_py.asyncio.Redis.from_url(redis_url)
            try:
                assert await admin.client_kill_filter(_type="pubsub") == 2  # both workers' channels
                holder.release(slot)  # published to nobody: it waits in the granted hash
            finally:
                await admin.aclose()
            backend, waited = await asyncio.wait_for(waiting, 5)
            assert backend is not None and waited > 0
            waiting_on.release(backend)

    asyncio.run(asyncio.wait_for(scenario(), 30))
