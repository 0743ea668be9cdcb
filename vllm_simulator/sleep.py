"""vLLM's sleep mode for the simulated engine: pause the scheduler, put parts of the model to sleep, wake them.

Follows vLLM 0.32's engine core and executor (v1/engine/core.py, v1/executor/abstract.py): a sleep pauses
the scheduler (scheduler.py), then offloads the weights and the KV cache (level 1 and 2); a wake brings
back some or all of them, and scheduling resumes only once all are back. The routes are in sleep_api.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from .config import SimulatorConfig
from .errors import ApiError
from .scheduler import PauseState, Scheduler

log = logging.getLogger(__name__)

PauseMode = Literal["abort", "wait", "keep"]
PAUSE_MODES: tuple[PauseMode, ...] = ("abort", "wait", "keep")
MAX_LEVEL = 2

# What a sleep of level 1 or 2 takes off the device, as vLLM's executor names the parts.
SLEEP_TAGS = ("weights", "kv_cache")
# The share of --wake-seconds each part takes: the weights are copied back (most of a real wake),
# the KV cache is only allocated again.
_WAKE_SHARES = {"weights": 0.75, "kv_cache": 0.25}

T = TypeVar("T")


class SleepMode:
    """The engine's sleep state and its two operations, taken one at a time in the order they come."""

    def __init__(self, config: SimulatorConfig, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        # Without --enable-sleep-mode vLLM still pauses and resumes, but nothing moves off the
        # device (the CPU worker logs that it ignores the sleep), so it takes no time.
        self.enabled = config.enable_sleep_mode
        self.sleep_seconds = config.sleep_seconds
        self.wake_seconds = config.wake_seconds
        self.sleeping_tags: set[str] = set()  # the parts off the device now
        self.level: int | None = None  # the last sleep's level, until fully awake
        # What vLLM's vllm:engine_sleep_state gauge shows: set after a sleep has finished and after a
        # full wake, not while either runs, and not by a partial wake.
        self.recorded_asleep = False
        self.recorded_level = 0
        # Counters, as /_simulator/stats tells them.
        self.sleeps = 0
        self.wakes = 0
        self._turn = asyncio.Lock()
        self._operations: set[asyncio.Task[Any]] = set()

    @property
    def is_sleeping(self) -> bool:
        """vLLM's is_sleeping: the scheduler is paused or some part is off the device."""
        return self.scheduler.pause_state is not PauseState.UNPAUSED or bool(self.sleeping_tags)

    async def sleep(self, level: int, mode: PauseMode) -> None:
        await self._in_turn(self._sleep(level, mode))

    async def wake_up(self, tags: list[str] | None) -> bool:
        """Wake the parts named (None: all); whether the engine is fully awake."""
        return await self._in_turn(self._wake_up(tags))

    def stats(self) -> dict[str, Any]:
        return {
            "is_sleeping": self.is_sleeping,
            "level": self.level,
            "sleeping_tags": sorted(self.sleeping_tags),
            "scheduler": self.scheduler.pause_state.name.lower(),
            "sleeps": self.sleeps,
            "wakes": self.wakes,
        }

    def reset_stats(self) -> None:
        self.sleeps = self.wakes = 0

    async def _sleep(self, level: int, mode: PauseMode) -> None:
        # A second sleep pauses again: mode=wait after mode=keep lets the frozen requests go on to
        # their end, as vLLM's scheduler does when the pause changes from PAUSED_ALL to PAUSED_NEW.
        self.scheduler.pause(PauseState.PAUSED_ALL if mode == "keep" else PauseState.PAUSED_NEW)
        if mode == "abort":
            aborted = self.scheduler.abort_all()
            log.warning("SIMULATOR: sleep (mode abort) aborted %d request(s)", aborted)
        if mode == "wait":
            await self.scheduler.drained()
        # Level 0 only pauses. vLLM's executor offloads only once: a second sleep finds the weights gone.
        if level >= 1 and "weights" not in self.sleeping_tags:
            if self.enabled:
                await asyncio.sleep(self.sleep_seconds)
            else:
                log.warning("SIMULATOR: sleep mode is not enabled (--enable-sleep-mode): nothing offloaded")
            self.sleeping_tags.update(SLEEP_TAGS)
        self.level = level
        self.recorded_asleep, self.recorded_level = True, level
        self.sleeps += 1
        log.warning("SIMULATOR: sleeping at level %d (mode %s)", level, mode)

    async def _wake_up(self, tags: list[str] | None) -> bool:
        if tags is not None and "scheduling" in tags:
            # vLLM's tag for the level-0 pause; it moves no memory.
            tags = [tag for tag in tags if tag != "scheduling"]
        if tags is None or tags:
            await self._wake_parts(tags)
        self.wakes += 1
        if self.sleeping_tags:
            return False
        self.scheduler.resume()
        self.level = None
        self.recorded_asleep, self.recorded_level = False, 0
        log.warning("SIMULATOR: awake")
        return True

    async def _wake_parts(self, tags: list[str] | None) -> None:
        """Bring back the parts named, as vLLM's executor does: nothing if one of them is not asleep."""
        if not self.sleeping_tags:
            return
        if tags and any(tag not in self.sleeping_tags for tag in tags):
            log.warning("SIMULATOR: wake_up tags %s: not all of them sleep (%s)", tags, sorted(self.sleeping_tags))
            return
        parts = set(tags or self.sleeping_tags)
        if self.enabled:
            await asyncio.sleep(self.wake_seconds * sum(_WAKE_SHARES[part] for part in parts))
        if not tags:
            self.sleeping_tags.clear()
            return
        for tag in tags:
            if tag not in self.sleeping_tags:
                # A tag named twice: vLLM's executor fails on removing it again, once the first has
                # woken, and the server answers 500 with the KeyError's text.
                raise ApiError(500, f"Call to wake_up method failed: {tag!r}")
            self.sleeping_tags.remove(tag)

    async def _in_turn(self, operation: Coroutine[Any, Any, T]) -> T:
        # vLLM's engine core finishes an operation it has begun even when the caller hangs up, so the
        # operation runs as a task of its own that a cancelled handler leaves running.
        task = asyncio.ensure_future(self._locked(operation))
        self._operations.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    async def _locked(self, operation: Coroutine[Any, Any, T]) -> T:
        async with self._turn:
            return await operation

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._operations.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so an error nobody awaited is not logged as lost
