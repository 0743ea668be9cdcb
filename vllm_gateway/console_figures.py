"""What the console's overview draws over time (`GET /admin/overview`): each model's requests and tokens
per minute over the last hour and day, its tokens per second now, and its TTFT quantiles over the last
five minutes.

Nothing is added to the request path: a background task (keep_sampling, started in app.py's lifespan)
reads the counters the metrics keep anyway (metrics/recording.py) every GATEWAY_CONSOLE_SAMPLE_SECONDS,
added up over the workers as /metrics adds them, and keeps the differences. All of it is in memory and
bounded: two rows of 1440 minutes per model, and five minutes of readings. A restart starts it empty.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from time import time

from .metrics.recording import COMPLETION, PROMPT, REQUESTS, TTFT_AT, TTFT_BUCKETS, Labels, Metrics
from .metrics.workers import sibling_figures

log = logging.getLogger("vllm_gateway.console")

DAY_MINUTES = 1440
HOUR_MINUTES = 60
RATE_WINDOW = 30.0  # seconds behind "tokens per second now"
TTFT_WINDOW = 300.0  # seconds the TTFT quantiles cover

# A model's counters at one moment, one flat list: requests, tokens (prompt and completion), completion
# tokens, then the TTFT histogram's count per bucket (TTFT_BUCKETS, then above them all).
REQ, TOKENS, COMPLETED, TTFT = 0, 1, 2, 3
COUNTERS = TTFT + len(TTFT_BUCKETS) + 1


@dataclass
class Reading:
    """The gateway's counters at one moment (`at`, unix seconds), over every worker: per model, and the
    requests in flight per (model, backend id)."""

    at: float
    totals: dict[str, list[float]] = field(default_factory=dict)
    in_flight: dict[Labels, float] = field(default_factory=dict)

    def add_series(self, series: Iterable[tuple[Labels, list[float]]], models: Collection[str]) -> None:
        """Add metrics series (labels: model, backend, key name, status class) to the models' totals."""
        for labels, values in series:
            model = labels[0]
            if model not in models:
                continue  # "-" and "unknown": requests that named no model the gateway has
            totals = self.totals.get(model)
            if totals is None:
                totals = self.totals[model] = [0.0] * COUNTERS
            totals[REQ] += values[REQUESTS]
            totals[TOKENS] += values[PROMPT] + values[COMPLETION]
            totals[COMPLETED] += values[COMPLETION]
            for index in range(len(TTFT_BUCKETS) + 1):
                totals[TTFT + index] += values[TTFT_AT + index]

    def of(self, model: str) -> list[float]:
        return self.totals.get(model) or [0.0] * COUNTERS


def worker_reading(metrics: Metrics) -> Reading:
    """This worker's counters now: read on the event loop, where they change."""
    reading = Reading(time())
    registry = metrics.registry
    reading.add_series(((labels, series.figures()) for labels, series in metrics.series.items()), registry.models)
    for model in registry.models.values():
        for backend in model.backends:
            reading.in_flight[(model.name, backend.spec.id)] = float(backend.in_flight)
    return reading


def add_siblings(reading: Reading, run_dir: Path) -> None:
    """The other workers' last snapshots (metrics/workers.py) added to `reading`; file reads, for a thread."""
    models = set(reading.totals) | {labels[0] for labels in reading.in_flight}
    for figures in sibling_figures(run_dir):
        reading.add_series(figures.series.items(), models)
        for labels, value in figures.in_flight.items():
            reading.in_flight[labels] = reading.in_flight.get(labels, 0.0) + value


async def gateway_reading(metrics: Metrics, run_dir: Path | None) -> Reading:
    """The whole gateway's counters now; `run_dir` where several workers leave their snapshots, else None."""
    reading = worker_reading(metrics)
    if run_dir is not None:
        await asyncio.to_thread(add_siblings, reading, run_dir)
    return reading


class MinuteRows:
    """A model's requests and tokens per minute, a ring of a day's minutes (slot: minute % 1440)."""

    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests = array("q", bytes(8 * DAY_MINUTES))
        self.tokens = array("q", bytes(8 * DAY_MINUTES))


class FigureHistory:
    """The readings of the last five minutes and each model's minutes of the last day."""

    def __init__(self, sample_seconds: float) -> None:
        # One more reading than the window holds, so that one is at least TTFT_WINDOW old once it has run that long.
        self.recent: deque[Reading] = deque(maxlen=int(TTFT_WINDOW / sample_seconds) + 2)
        self.rows: dict[str, MinuteRows] = {}
        self.minute_of_slot = array("q", [-1]) * DAY_MINUTES  # which minute each slot holds now

    # -- the sampler's side --

    def add(self, reading: Reading, models: Collection[str]) -> None:
        """A new reading: what each model did since the last one goes to the minute it was read in."""
        if self.recent:
            before = self.recent[-1]
            minute = int(reading.at // 60)
            slot = self._slot(minute)
            for model in models:
                requests, tokens = grown(before.of(model), reading.of(model))
                if requests or tokens:
                    rows = self.rows.get(model) or self.rows.setdefault(model, MinuteRows())
                    rows.requests[slot] += requests
                    rows.tokens[slot] += tokens
        self.recent.append(reading)
        for gone in set(self.rows) - set(models):
            del self.rows[gone]  # a model taken out of the config

    def _slot(self, minute: int) -> int:
        slot = minute % DAY_MINUTES
        if self.minute_of_slot[slot] != minute:  # a day-old minute: its slot starts over
            for rows in self.rows.values():
                rows.requests[slot] = rows.tokens[slot] = 0
            self.minute_of_slot[slot] = minute
        return slot

    # -- the overview's side --

    def per_minute(self, now: Reading, models: Collection[str]) -> dict[str, object]:
        """Requests and tokens per minute of each model over the last hour and day, the current minute
        with what `now` has counted since the last reading."""
        minute = int(now.at // 60)
        pending = {model: grown(self.recent[-1].of(model), now.of(model)) for model in models} if self.recent else {}
        result: dict[str, object] = {}
        for name, length in (("hour", HOUR_MINUTES), ("day", DAY_MINUTES)):
            first = minute - length + 1
            requests: dict[str, list[int]] = {}
            tokens: dict[str, list[int]] = {}
            for model in models:
                requests[model], tokens[model] = self._series(model, first, length)
                if model in pending:
                    requests[model][-1] += pending[model][0]
                    tokens[model][-1] += pending[model][1]
            result[name] = {"start": first * 60, "step_s": 60, "requests": requests, "tokens": tokens}
        return result

    def _series(self, model: str, first: int, length: int) -> tuple[list[int], list[int]]:
        rows = self.rows.get(model)
        if rows is None:
            return [0] * length, [0] * length
        requests, tokens = [0] * length, [0] * length
        held = self.minute_of_slot
        for index in range(length):
            minute = first + index
            slot = minute % DAY_MINUTES
            if held[slot] == minute:
                requests[index], tokens[index] = rows.requests[slot], rows.tokens[slot]
        return requests, tokens

    def tokens_per_second(self, now: Reading, model: str) -> float:
        """Completion tokens per second over the last RATE_WINDOW seconds (or since the start)."""
        base = self._base(now.at - RATE_WINDOW)
        if base is None or now.at <= base.at:
            return 0.0
        completed = max(0.0, now.of(model)[COMPLETED] - base.of(model)[COMPLETED])
        return round(completed / (now.at - base.at), 2)

    def ttft_quantiles(self, now: Reading, model: str, quantiles: Iterable[float]) -> list[float | None]:
        """TTFT quantiles in milliseconds over the last TTFT_WINDOW seconds (or since the start); None
        where no request had a first token then."""
        base = self._base(now.at - TTFT_WINDOW)
        current, before = now.of(model), base.of(model) if base is not None else [0.0] * COUNTERS
        counts = [max(0.0, current[index] - before[index]) for index in range(TTFT, COUNTERS)]
        found = [histogram_quantile(quantile, TTFT_BUCKETS, counts) for quantile in quantiles]
        return [None if seconds is None else round(seconds * 1000, 1) for seconds in found]

    def _base(self, since: float) -> Reading | None:
        """The newest reading from `since` or before, else the oldest one (the history is younger)."""
        base = None
        for reading in self.recent:
            if reading.at > since:
                break
            base = reading
        return base or (self.recent[0] if self.recent else None)


def grown(before: list[float], after: list[float]) -> tuple[int, int]:
    """Requests and tokens counted between two readings (none when a worker's counts went with it)."""
    return int(max(0.0, after[REQ] - before[REQ])), int(max(0.0, after[TOKENS] - before[TOKENS]))


def histogram_quantile(quantile: float, bounds: tuple[float, ...], counts: list[float]) -> float | None:
    """The quantile of a histogram (a count per bucket, `bounds` then above them all), interpolated in
    its bucket as Prometheus's histogram_quantile does: above the last bound, that bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = quantile * total
    below = 0.0
    for index, count in enumerate(counts):
        if below + count >= rank and count:
            if index == len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - below) / count
        below += count
    return bounds[-1]


async def keep_sampling(history: FigureHistory, metrics: Metrics, run_dir: Path | None, seconds: float) -> None:
    """The sampler: a reading every `seconds`, for as long as the gateway runs."""
    while True:
        try:
            history.add(await gateway_reading(metrics, run_dir), list(metrics.registry.models))
        except Exception:  # a bug here must not end the console's figures for good
            log.exception("console figures: a reading failed")
        await asyncio.sleep(seconds)
