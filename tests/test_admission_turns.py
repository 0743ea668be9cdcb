"""The order of admission between keys (admission.ModelQueue): deficit round robin, one request per
turn, or `weight` requests; no process needed, the queue is plain data."""

from __future__ import annotations

import asyncio

from vllm_gateway.admission import ModelQueue, Waiter
from vllm_gateway.registry import Model


def admitted(*queued: tuple[str, float, int], remove: tuple[str, int] | None = None) -> str:
    """Queue `count` requests per (key, weight, count), in that order; return the keys as admitted."""
    loop = asyncio.new_event_loop()
    try:
        queue = ModelQueue(Model("m", ""))
        waiters: dict[str, list[Waiter]] = {}
        for key, weight, count in queued:
            for _ in range(count):
                waiter = Waiter(key, loop.create_future())
                waiters.setdefault(key, []).append(waiter)
                queue.push(waiter, weight)
        if remove is not None:
            queue.remove(waiters[remove[0]][remove[1]])
        order = []
        while (waiter := queue.pop()) is not None:
            order.append(waiter.key_id)
        assert queue.size == 0 and not queue.turns
        return "".join(order)
    finally:
        loop.close()


def test_keys_of_equal_weight_take_turns_one_request_each() -> None:
    assert admitted(("A", 1, 4), ("B", 1, 2), ("C", 1, 1)) == "ABCABAA"


def test_a_key_of_weight_two_sends_two_requests_per_turn() -> None:
    assert admitted(("A", 1, 6), ("B", 2, 6)) == "ABBABBABBAAA"


def test_a_weight_below_one_adds_up_over_turns() -> None:
    assert admitted(("A", 0.5, 3), ("B", 1, 4)) == "BABBAB" + "A"


def test_a_request_taken_out_of_the_queue_is_never_admitted() -> None:
    assert admitted(("A", 1, 1), ("B", 1, 2), remove=("A", 0)) == "BB"
