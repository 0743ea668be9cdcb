"""Fair admission: no backend gets more requests than its capacity, and the rest wait, fairly.

A backend's capacity is its `max_concurrency` from the model config, else its `max_num_seqs`, else
none (model_config.BackendSpec.capacity). A request is in flight from the moment a backend is chosen
for it until its last byte went to the client. Its Slot holds both its key's count and the backend,
and gives each back once, when the request ends however it ends.

A request that finds every ready replica of its model full waits in the model's queue. When a slot
frees (a request ends, a replica comes up), the next request is chosen by deficit round robin over
the keys that wait: each key has its own first-in-first-out queue, and on its turn a key sends as many
requests as its weight (default 1; fractions carry over to its next turn). One busy key cannot starve
the others, and a key of weight 2 gets twice the turns of a key of weight 1 while both wait.

Bounds, each answered at once:
- a key with `max_parallel_requests` (default GATEWAY_MAX_PARALLEL_REQUESTS) requests in flight or
  waiting gets 429 `parallel_requests_exceeded`: the key is over its own limit;
- a model with GATEWAY_QUEUE_LIMIT requests waiting answers the next one 503 `queue_full`, and a
  request that waited GATEWAY_QUEUE_TIMEOUT seconds gets 503 `queue_timeout`: the servers are
  saturated, which no key caused, so these are 503 with Retry-After, like an overloaded server;
- when the model has no ready replica left, its waiting requests get 503 `model_not_ready`;
  unless a replica sleeps or stopped as idle (registry.DORMANT): then they wait, within the queue
  timeout, while it wakes (`wake`, which wake_on_demand.py answers), and go once it is ready.

A request whose client goes away while it waits is cancelled (http_protocol.connection_lost) and
leaves the queue at once; it never reaches vLLM. /tokenize and /detokenize take no sequence in vLLM,
so they never wait (they count in flight while they last, a few milliseconds).

The counts live in this worker's memory; with several workers, admission.shared.SharedAdmission
keeps them in Redis instead, for the gateway as a whole.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence

from mypy_extensions import mypyc_attr

from .. import errors
from ..key_limits import KeyLimits
from ..registry import Backend, BackendState, Model, Registry
from ..settings import Settings


class Waiter:
    __slots__ = ("future", "key_id")

    def __init__(self, key_id: str, future: asyncio.Future[Backend]) -> None:
        self.key_id = key_id
        self.future = future


class ModelQueue:
    """The requests waiting for one model: a FIFO per key, and the keys' turns (deficit round robin)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.by_key: dict[str, deque[Waiter]] = {}
        self.turns: deque[str] = deque()  # keys with waiting requests; the first has the turn
        self.deficit: dict[str, float] = {}  # requests a key may still send in its turn
        self.weight: dict[str, float] = {}
        self.size = 0

    def push(self, waiter: Waiter, weight: float) -> None:
        waiting = self.by_key.get(waiter.key_id)
        if waiting is None:
            waiting = self.by_key[waiter.key_id] = deque()
            self.turns.append(waiter.key_id)
            self.deficit[waiter.key_id] = 0.0
        self.weight[waiter.key_id] = weight  # the key's weight as of its latest request
        waiting.append(waiter)
        self.size += 1

    def remove(self, waiter: Waiter) -> None:
        """Take a waiter out (its client left, or it timed out); nothing when it is not queued."""
        waiting = self.by_key.get(waiter.key_id)
        if waiting is None or waiter not in waiting:
            return
        waiting.remove(waiter)
        self.size -= 1
        if not waiting:
            self._drop(waiter.key_id)

    def pop(self) -> Waiter | None:
        """The next waiter by deficit round robin: a key's turn gives it `weight` more requests."""
        if not self.turns:
            return None
        key_id = self.turns[0]
        if self.deficit[key_id] < 1:
            key_id = self.next_turn()
        self.deficit[key_id] -= 1
        waiting = self.by_key[key_id]
        waiter = waiting.popleft()
        self.size -= 1
        if not waiting:
            self._drop(key_id)  # a key that stops waiting keeps no credit, as in DRR
        elif self.deficit[key_id] < 1:
            self.turns.rotate(-1)  # its turn is over
        return waiter

    def next_turn(self) -> str:
        """Give the keys their turns, in order, until one has a whole request to send, and make it
        first; returns it. A key whose credit stays below 1 passes its turn on, so weights below 1
        add up over several turns; those turns are counted here, not taken one by one, so that no
        weight, however small, makes this loop (1e-7 alone would take ten million turns)."""
        first = self.turns[0]
        credit = self.deficit[first] + self.weight[first]
        if credit >= 1:  # the usual case: a weight of 1 or more
            self.deficit[first] = credit
            return first
        keys = list(self.turns)
        needed = [turns_to_send(self.deficit[key_id], self.weight[key_id]) for key_id in keys]
        rounds = min(needed)
        winner = needed.index(rounds)  # the first in turn of those that need the fewest turns
        # Those before the winner in this round had `rounds` turns, those after it one fewer.
        for position, key_id in enumerate(keys):
            turns = rounds if position <= winner else rounds - 1
            self.deficit[key_id] = self.deficit[key_id] + turns * self.weight[key_id]
        self.turns.rotate(-winner)
        return keys[winner]

    def drain(self) -> list[Waiter]:
        waiters = [waiter for waiting in self.by_key.values() for waiter in waiting]
        self.by_key.clear()
        self.turns.clear()
        self.deficit.clear()
        self.weight.clear()
        self.size = 0
        return waiters

    def _drop(self, key_id: str) -> None:
        del self.by_key[key_id]
        self.turns.remove(key_id)
        del self.deficit[key_id]
        del self.weight[key_id]


def turns_to_send(deficit: float, weight: float) -> int:
    """How many turns, of `weight` each, a key with `deficit` needs before it may send a request
    (at least one). Counted in floating point exactly as the turns add up, so that the Lua copy of
    this (admission/scripts.py) finds the same number."""
    turns = max(1, math.ceil((1 - deficit) / weight))
    if turns > 1 and deficit + (turns - 1) * weight >= 1:
        turns -= 1
    if deficit + turns * weight < 1:
        turns += 1
    return turns


# Compiled by mypyc (scripts/compile_gateway.py), a class takes subclasses of the interpreter's only
# when it says so: shared.SharedAdmission is one.
@mypyc_attr(allow_interpreted_subclasses=True)
class Admission:
    """Which backend a request goes to and when; with GATEWAY_ADMISSION=false, at once to the least
    busy ready backend, as without admission."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.enabled = settings.admission
        self.queue_timeout = settings.queue_timeout
        self.queue_limit = settings.queue_limit
        self.registry = registry
        self.queues: dict[str, ModelQueue] = {}
        self.per_key: dict[str, int] = {}  # requests in flight or waiting, per key id (counted by their Slot)
        # Asks a model's dormant servers to come back (GatewayState wires it to wake_on_demand.py).
        self.wake: Callable[[Model], None] = lambda model: None
        self.changes = asyncio.Event()  # set, and replaced, at every change of the backends
        registry.listeners.append(self.backends_changed)

    def waiting(self, model_name: str) -> int:
        """Requests of this worker waiting for `model_name` (the metrics add the workers up)."""
        queue = self.queues.get(model_name)
        return queue.size if queue is not None else 0

    def waiting_everywhere(self, model_name: str) -> int:
        """Requests of every worker waiting for `model_name` (/health)."""
        return self.waiting(model_name)

    async def start(self) -> None:
        """Nothing to start for one worker (SharedAdmission connects to Redis)."""

    async def stop(self) -> None:
        """Nothing to stop for one worker."""

    # -- backends --

    async def acquire(
        self, model: Model, key: KeyLimits, exclude: Sequence[Backend] = (), at_once: bool = False
    ) -> tuple[Backend | None, float]:
        """A ready backend of `model` for one request, counted in its `in_flight`, and the seconds the
        request waited for it; None when no ready backend (but those in `exclude`) is left. With
        `at_once` (a request that takes no sequence in vLLM) the least busy one, full or not."""
        if not self.enabled or at_once:
            backend, waited = model.pick(exclude), 0.0
            if backend is None and model.wakeable:
                backend, waited = await self.until_awake(model, exclude)
            if backend is not None:
                backend.in_flight += 1
            return backend, waited
        queue = self.queues.get(model.name)
        if queue is None or not queue.size:  # nobody waits: no one is overtaken
            backend = model.pick(exclude, with_room=True)
            if backend is not None:
                backend.in_flight += 1
                return backend, 0.0
        if model.pick(exclude) is None:
            if not model.wakeable:
                return None, 0.0
            self.wake(model)  # and wait in the queue, in turn, until a server is back
        if queue is None:
            queue = self.queues[model.name] = ModelQueue(model)
        if queue.size >= self.queue_limit:
            raise errors.queue_full(model.name, self.queue_limit)
        queue.model = model
        loop = asyncio.get_running_loop()
        waiter = Waiter(key.id, loop.create_future())
        queue.push(waiter, key.weight)
        timer = loop.call_later(self.queue_timeout, self._expire, queue, waiter)
        started = time.perf_counter()
        try:
            backend = await waiter.future
        except BaseException:
            # Cancelled (the client left) or refused: out of the queue at once. A backend handed over
            # just before the cancellation goes back to the next waiter.
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())
            queue.remove(waiter)
            raise
        finally:
            timer.cancel()
            if not queue.size and self.queues.get(model.name) is queue:
                del self.queues[model.name]
        return backend, time.perf_counter() - started

    async def until_awake(self, model: Model, exclude: Sequence[Backend]) -> tuple[Backend | None, float]:
        """Without the queue (admission off, or a request that never waits for room): wait, within
        the queue timeout, until a dormant server of the model is ready; None when none is coming."""
        self.wake(model)
        started = time.perf_counter()
        deadline = started + self.queue_timeout
        while True:
            model = self.registry.models.get(model.name) or model  # the config may have changed
            backend = model.pick(exclude)
            if backend is not None or not model.wakeable:
                return backend, time.perf_counter() - started
            try:
                await asyncio.wait_for(self.changes.wait(), deadline - time.perf_counter())
            except TimeoutError:
                raise errors.queue_timeout(model.name, self.queue_timeout) from None

    def release(self, backend: Backend, at_once: bool = False) -> None:
        """One request to `backend` ended (its last byte went out, or it failed): the next may go.
        `at_once` as it was acquired."""
        backend.in_flight -= 1
        if self.enabled:
            queue = self.queues.get(backend.spec.name)
            if queue is not None:
                self.dispatch(queue)

    def dispatch(self, queue: ModelQueue) -> None:
        """Hand free slots to waiters, in their fair order, each to the least busy backend with room."""
        while queue.size:
            backend = queue.model.pick(with_room=True)
            if backend is None:
                return
            waiter = queue.pop()
            if waiter is None:
                return
            if waiter.future.done():
                continue
            backend.in_flight += 1
            waiter.future.set_result(backend)

    def backends_changed(self) -> None:
        """A backend came up or went down, or the config changed: waiters go to a replica that is
        ready, or, when their model has none left (nor one coming back), get 503 at once."""
        self.announce_change()
        for name, queue in list(self.queues.items()):
            model = self.registry.models.get(name)
            if model is not None and (model.pick() is not None or model.wakeable):
                queue.model = model
                self.dispatch(queue)
                continue
            state = model.state if model is not None else BackendState.DOWN
            for waiter in queue.drain():
                if not waiter.future.done():
                    waiter.future.set_exception(errors.model_unavailable(name, state))
            del self.queues[name]

    def announce_change(self) -> None:
        """Wake the requests of until_awake, to look at the backends again."""
        self.changes.set()
        self.changes = asyncio.Event()

    def _expire(self, queue: ModelQueue, waiter: Waiter) -> None:
        if not waiter.future.done():
            queue.remove(waiter)
            waiter.future.set_exception(errors.queue_timeout(queue.model.name, self.queue_timeout))


class Slot:
    """One request's hold on admission, from its start until it closes: its key's count, and the
    backend that acquire() gave it, which its owner (proxy.open_upstream) records here at once. The
    owner closes it in one `finally` (proxy.admit_and_relay), however the request ends (answered,
    refused, failed, cancelled, its client gone), and each hold goes back once: release() and close()
    do nothing the second time."""

    __slots__ = ("admission", "key", "at_once", "backend", "counted")

    def __init__(self, admission: Admission, key: KeyLimits, at_once: bool) -> None:
        """Count one more request of `key`, or refuse it (429) when the key is at its cap (with
        admission off too: the cap bounds what one key holds, waiting or not). `at_once`: a request
        that takes no sequence in vLLM (Admission.acquire)."""
        count = admission.per_key.get(key.id, 0)
        if count >= key.parallel:
            raise errors.too_many_parallel_requests(key.parallel)
        admission.per_key[key.id] = count + 1
        self.admission = admission
        self.key = key
        self.at_once = at_once
        self.backend: Backend | None = None
        self.counted = True  # the key's count, until close()

    def release(self) -> None:
        """The backend goes back (the next request may go to it), the key's count stays: for a request
        that tries another backend."""
        backend = self.backend
        if backend is not None:
            self.backend = None
            self.admission.release(backend, self.at_once)

    def close(self) -> None:
        """The request ended: its backend and its key's count go back."""
        backend = self.backend  # release(), inlined: this runs for every request
        if backend is not None:
            self.backend = None
            self.admission.release(backend, self.at_once)
        if self.counted:
            self.counted = False
            per_key, key_id = self.admission.per_key, self.key.id
            count = per_key.get(key_id, 0) - 1
            if count > 0:
                per_key[key_id] = count
            else:
                per_key.pop(key_id, None)
