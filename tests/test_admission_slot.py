"""A request's hold on admission (admission.local.Slot): its key's count and its backend go back once,
however the request ends, released early or not, waiting or relayed. One worker's admission in memory,
no process needed."""

from __future__ import annotations

import asyncio

import pytest

from vllm_gateway.admission.local import Admission, Slot
from vllm_gateway.errors import GatewayError
from vllm_gateway.key_limits import KeyLimits
from vllm_gateway.model_config import BackendSpec
from vllm_gateway.registry import Backend, BackendState, Model, Registry
from vllm_gateway.settings import Settings

KEY = KeyLimits("key_a", "20/minute", None, 2, 1.0)


def one_worker(replicas: int = 1) -> tuple[Admission, Model]:
    specs = [
        BackendSpec(
            id=f"m-{n}",
            name="m",
            aliases=(),
            path="",
            base_url=f"http://127.0.0.1:{9 + n}",
            api_key=None,
            max_num_seqs=1,
        )
        for n in range(replicas)
    ]
    registry = Registry(specs)
    for backend in registry.backends():
        backend.state = BackendState.READY
    return Admission(Settings(), registry), registry.models["m"]


async def take(admission: Admission, slot: Slot, model: Model, exclude: list[Backend] | None = None) -> Backend | None:
    """What the slot's owner does (proxy.open_upstream): the backend acquire() gives is the slot's."""
    backend, _ = await admission.acquire(model, slot.key, exclude or [], slot.at_once)
    slot.backend = backend
    return backend


def held(admission: Admission, model: Model) -> tuple[int, list[int]]:
    """The key's count and each backend's requests in flight."""
    return admission.per_key.get(KEY.id, 0), [backend.in_flight for backend in model.backends]


def test_a_slot_closed_twice_gives_its_backend_and_its_keys_count_back_once() -> None:
    async def scenario() -> None:
        admission, model = one_worker()
        slot = Slot(admission, KEY, False)
        backend = await take(admission, slot, model)
        assert backend is not None and held(admission, model) == (1, [1])
        slot.close()
        slot.close()
        slot.release()
        assert held(admission, model) == (0, [0])

    asyncio.run(scenario())


def test_a_slot_released_to_try_another_backend_keeps_its_keys_count_and_holds_one_backend() -> None:
    async def scenario() -> None:
        admission, model = one_worker(replicas=2)
        slot = Slot(admission, KEY, False)
        first = await take(admission, slot, model)
        slot.release()
        assert held(admission, model) == (1, [0, 0])
        second = await take(admission, slot, model, [first] if first is not None else [])
        assert second is not None and second is not first
        assert held(admission, model)[1].count(1) == 1
        slot.close()
        assert held(admission, model) == (0, [0, 0])

    asyncio.run(scenario())


def test_a_slot_whose_request_is_cancelled_while_it_waits_holds_nothing_once_closed() -> None:
    async def scenario() -> None:
        admission, model = one_worker()
        busy = Slot(admission, KeyLimits("key_b", "20/minute", None, 2, 1.0), False)
        await take(admission, busy, model)
        slot = Slot(admission, KEY, False)

        async def request() -> Backend | None:
            try:
                return await take(admission, slot, model)
            finally:
                slot.close()

        waiting = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        assert admission.waiting("m") == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert admission.waiting("m") == 0 and held(admission, model) == (0, [1])
        busy.close()  # the backend is free and nobody waits for it
        assert model.backends[0].in_flight == 0

    asyncio.run(scenario())


def test_a_key_at_its_cap_is_refused_before_it_holds_anything() -> None:
    admission, model = one_worker()
    slots = [Slot(admission, KEY, False), Slot(admission, KEY, False)]
    with pytest.raises(GatewayError) as refused:
        Slot(admission, KEY, False)
    assert refused.value.code == "parallel_requests_exceeded"
    assert held(admission, model) == (2, [0])
    for slot in slots:
        slot.close()
    assert held(admission, model) == (0, [0])
