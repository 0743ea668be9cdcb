"""The simulated engine's scheduler: --max-num-seqs slots, a first-come queue, and the pause that sleep uses.

A generation holds a Ticket from the moment it is queued until it ends. vLLM's sleep (sleep.py) pauses
the scheduler: queued and new requests wait, running ones go on (PAUSED_NEW) or freeze (PAUSED_ALL),
and mode=abort ends every request the engine holds, queued or running.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque


class PauseState(enum.IntEnum):
    """vLLM's scheduler pause states (v1/core/sched/interface.py)."""

    UNPAUSED = 0
    PAUSED_NEW = 1  # nothing new starts; running requests go on (sleep mode=abort and mode=wait)
    PAUSED_ALL = 2  # nothing moves: running requests freeze where they are (sleep mode=keep)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Ticket:
    """One request's place in the engine: queued, then running; maybe frozen, maybe aborted."""

    # A ticket is made per generation, and its checks run once per token.
    __slots__ = ("_scheduler", "running", "aborted", "done", "_waiter")

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self.running = False  # holds one of the --max-num-seqs slots
        self.aborted = False  # the engine ended it (sleep with mode=abort) before its last token
        self.done = False  # its last token is out: an abort no longer concerns it
        self._waiter: asyncio.Future[None] | None = None  # what it awaits now, for an abort to cut short

    @property
    def held(self) -> bool:
        """The request may not make its next token now: aborted, or the engine is frozen."""
        return self.aborted or self._scheduler.pause_state is PauseState.PAUSED_ALL

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of generation time; an abort or a freeze ends the wait early (check `held`)."""
        # Built like asyncio.sleep (a future and a timer), so that the pause can wake it early at the
        # same cost per token.
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(seconds, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def hold(self) -> float:
        """Wait while the engine is frozen (until it resumes or aborts this request); the seconds held."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while self._scheduler.pause_state is PauseState.PAUSED_ALL and not self.aborted:
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return loop.time() - started

    def _interrupt(self) -> None:
        if self._waiter is not None:
            _wake(self._waiter)


class Scheduler:
    """Admits queued requests in order while a slot is free and the engine is not paused."""

    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.pause_state = PauseState.UNPAUSED
        self._queue: deque[Ticket] = deque()
        self._running: set[Ticket] = set()
        self._drain_waiters: list[asyncio.Future[None]] = []

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # The generations' side.

    async def admit(self, ticket: Ticket) -> None:
        """Wait in the queue until the ticket runs, or until an abort ends it first (ticket.aborted)."""
        if not self._queue and self._can_start():
            self._start(ticket)
            return
        waiter = ticket._waiter = asyncio.get_running_loop().create_future()
        self._queue.append(ticket)
        try:
            await waiter
        except asyncio.CancelledError:  # the client gave up while queued
            if ticket in self._queue:
                self._queue.remove(ticket)
            else:  # a slot was granted as it left: hand it on
                self.finish(ticket)
            raise
        finally:
            ticket._waiter = None

    def finish(self, ticket: Ticket) -> None:
        """The request has ended (however it ended): its slot goes to the next one queued."""
        if not ticket.running:
            return
        ticket.running = False
        self._running.discard(ticket)
        self._admit_queued()
        if not self._running:
            for waiter in self._drain_waiters:
                _wake(waiter)
            self._drain_waiters.clear()

    # Sleep's side.

    def pause(self, state: PauseState) -> None:
        self.pause_state = state
        for ticket in self._running:  # a frozen request must stop between tokens, not after the next
            ticket._interrupt()

    def resume(self) -> None:
        self.pause_state = PauseState.UNPAUSED
        for ticket in self._running:
            ticket._interrupt()
        self._admit_queued()

    def abort_all(self) -> int:
        """End every request the engine holds, queued or running, as vLLM's finish_requests(None) does;
        how many were ended."""
        aborted = 0
        while self._queue:
            ticket = self._queue.popleft()
            ticket.aborted = True
            if ticket._waiter is not None:
                _wake(ticket._waiter)
            aborted += 1
        for ticket in self._running:
            if not ticket.done:
                ticket.aborted = True
                ticket._interrupt()
                aborted += 1
        return aborted

    async def drained(self) -> None:
        """Return once no request is running (sleep mode=wait); queued ones stay queued."""
        if self._running:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    # Helpers.

    def _can_start(self) -> bool:
        return self.pause_state is PauseState.UNPAUSED and len(self._running) < self.max_num_seqs

    def _start(self, ticket: Ticket) -> None:
        ticket.running = True
        self._running.add(ticket)

    def _admit_queued(self) -> None:
        while self._queue and self._can_start():
            ticket = self._queue.popleft()
            self._start(ticket)
            if ticket._waiter is not None:
                _wake(ticket._waiter)
