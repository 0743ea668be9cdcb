"""The order of admission between keys (admission.ModelQueue): deficit round robin, one request per
turn, or `weight` requests; no process needed, the queue is plain data."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections import deque
from collections.abc import Iterator

import pytest

from vllm_gateway.admission.local import ModelQueue, Waiter
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


@contextlib.contextmanager
def at_most(seconds: float) -> Iterator[None]:
    """Fails what runs inside if it takes longer than `seconds` (a loop that never ends included)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still turning after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("weight", [1e-300, 1e-7])
def test_a_key_of_tiny_weight_waiting_alone_is_admitted_at_once(weight: float) -> None:
    # Its credit reaches a whole request only after 1/weight turns: they are counted, not taken.
    with at_most(5):
        assert admitted(("A", weight, 3)) == "AAA"


def test_keys_of_tiny_weights_take_turns_in_proportion() -> None:
    with at_most(5):
        tiny = admitted(("A", 1e-9, 4), ("B", 2e-9, 8))
    # B needs half of A's billion turns to send one: it sends first, then two for each of A's.
    assert tiny == "BAB" * 4


def turn_by_turn(queued: list[tuple[str, float]]) -> str:
    """Deficit round robin as the textbook loop: a key's turn adds its weight, a key below one
    request passes the turn on. The reference for weights that need few turns."""
    lines: dict[str, int] = {}
    weights: dict[str, float] = {}
    for key, weight in queued:
        lines[key] = lines.get(key, 0) + 1
        weights[key] = weight
    turns = deque(dict.fromkeys(key for key, _ in queued))
    deficit = dict.fromkeys(turns, 0.0)
    order = ""
    while turns:
        key = turns[0]
        if deficit[key] < 1:
            deficit[key] += weights[key]
            if deficit[key] < 1:
                turns.rotate(-1)
                continue
        deficit[key] -= 1
        lines[key] -= 1
        order += key
        if not lines[key]:
            turns.popleft()
            del deficit[key]
        elif deficit[key] < 1:
            turns.rotate(-1)
    return order


@pytest.mark.parametrize("seed", range(20))
def test_counted_turns_admit_in_the_order_of_turns_taken_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    # Weights that binary fractions hold exactly, so that adding them turn by turn rounds nothing.
    weights = {key: rng.choice([0.03125, 0.0625, 0.1875, 0.25, 0.375, 0.5, 1, 1.5, 2.75]) for key in "ABCDE"}
    queued = [(key, weights[key]) for key in rng.choices("ABCDE", k=40)]
    counts: dict[str, int] = {}
    for key, _ in queued:
        counts[key] = counts.get(key, 0) + 1
    # Each key's requests queued in the order the keys first came, as `admitted` does.
    per_key = [(key, weights[key], counts[key]) for key in dict.fromkeys(key for key, _ in queued)]
    assert admitted(*per_key) == turn_by_turn(
        [(key, weights[key]) for key, weight, count in per_key for _ in range(count)]
    )
