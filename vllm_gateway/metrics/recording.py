"""Recording, on the request path: one relayed request's figures added to plain counters.

It runs for every relayed request, so it is a dictionary lookup by a tuple of labels and a few
additions to one `Series` (histograms are per-bucket counts, made cumulative when rendered);
prometheus_client's objects, with a lock and a label lookup per family, would cost several times
that. A series is laid out as a flat list of numbers for the copies and snapshots (workers.py) and
the text (exposition.py); that layout is declared here.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Final, Protocol

from ..keystore import KeyRecord
from ..outcome import Outcome
from ..registry import Registry

# What stands for a model the registry does not know: client input never becomes a label value.
UNKNOWN: Final = "unknown"

# Typed as tuples of any length: mypyc keeps a tuple of fixed length as a C struct of doubles, and made
# a new Python tuple of it (each float boxed) every time one was searched.
Bounds = tuple[float, ...]
DURATION_BUCKETS: Bounds = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS: Bounds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OVERHEAD_BUCKETS: Bounds = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
QUEUE_BUCKETS: Bounds = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# A series' figures, one flat list: the counts and sums below, then each histogram's bucket counts
# (one more than its bounds: the last counts what is above every bound).
# (Final, one a line: compiled by mypyc, each is then a constant rather than a lookup per use.)
REQUESTS: Final = 0
PROMPT: Final = 1
COMPLETION: Final = 2
DURATION_SUM: Final = 3
TTFT_SUM: Final = 4
TTFT_COUNT: Final = 5
OVERHEAD_SUM: Final = 6
OVERHEAD_COUNT: Final = 7
DURATION_AT: Final = 8
TTFT_AT: Final = DURATION_AT + len(DURATION_BUCKETS) + 1
OVERHEAD_AT: Final = TTFT_AT + len(TTFT_BUCKETS) + 1
SERIES_SIZE: Final = OVERHEAD_AT + len(OVERHEAD_BUCKETS) + 1

# The gateway's 429s, by their error's type (errors.rate_limited, errors.tokens_limited).
RATE_LIMIT_KINDS: Final = {"rate_limit_error": "requests", "tokens": "tokens", "parallel_requests_exceeded": "parallel"}

STATUS_CLASSES: Final = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")

# (model, backend, key name, status class)
Labels = tuple[str, ...]


def bucket(bounds: Bounds, value: float) -> int:
    """The histogram bucket of `value`: the first bound not below it (len(bounds) above them all),
    as bisect_left finds it (for any value but NaN). Searched from the lowest bound up: a relayed
    request's time and the gateway's part of it mostly fall in the first buckets (a few milliseconds,
    a tenth of one), where this takes a comparison or two and a binary search four. Compiled, the
    searches of a non-streamed request went from about 660 instructions to 250 (callgrind); a long
    stream's duration takes up to 15 comparisons."""
    index = 0
    for bound in bounds:
        if bound >= value:
            return index
        index += 1
    return index


class Series:
    """One label set's figures as they are added to. Compiled by mypyc, each float attribute is a C
    double and an addition makes no object, where an addition to a flat list of floats made a float
    and freed one. `figures` lays them out flat, once a second, for the copies and the text."""

    def __init__(self) -> None:
        self.requests = 0.0
        self.prompt = 0.0
        self.completion = 0.0
        self.duration_sum = 0.0
        self.ttft_sum = 0.0
        self.ttft_count = 0.0
        self.overhead_sum = 0.0
        self.overhead_count = 0.0
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.ttft_buckets = [0] * (len(TTFT_BUCKETS) + 1)
        self.overhead_buckets = [0] * (len(OVERHEAD_BUCKETS) + 1)

    def figures(self) -> list[float]:
        """The flat layout: REQUESTS .. OVERHEAD_COUNT, then the buckets at DURATION_AT, TTFT_AT, OVERHEAD_AT."""
        sums = [
            self.requests,
            self.prompt,
            self.completion,
            self.duration_sum,
            self.ttft_sum,
            self.ttft_count,
            self.overhead_sum,
            self.overhead_count,
        ]
        buckets = [*self.duration_buckets, *self.ttft_buckets, *self.overhead_buckets]
        return sums + [float(count) for count in buckets]


# What admission holds, declared here so that this module does not import admission
# (admission.local.Admission), which reaches it through state.py.


class Admission(Protocol):
    """What admission holds now (admission.local.Admission): the requests waiting, and those of each key."""

    @property
    def per_key(self) -> dict[str, int]: ...
    def waiting(self, model_name: str) -> int: ...


class Metrics:
    """One worker's figures."""

    def __init__(self, registry: Registry, enabled: bool = True) -> None:
        self.registry = registry
        self.enabled = enabled
        self.series: dict[Labels, Series] = {}
        self.rate_limited: dict[Labels, float] = {}  # (key name, kind)
        self.upstream_errors: dict[Labels, float] = {}  # (model, backend, kind)
        # (model,) -> [seconds waited, requests that waited, bucket counts...]: admission's queue
        self.queue_waits: dict[Labels, list[float]] = {}
        # What admission holds now (read at a scrape, workers.figures_of): set by GatewayState once both exist.
        self.admission: Admission | None = None
        self.key_names: Callable[[], dict[str, str]] = dict

    # -- recording: the request path --

    def model_label(self, name: str) -> str:
        if name == "-":
            return name
        model = self.registry.resolve(name)
        return model.name if model is not None else UNKNOWN

    def request(self, outcome: Outcome, key: KeyRecord | None, started: float) -> None:
        """Count one relayed request as it ends (proxy.handle)."""
        if not self.enabled:
            return
        elapsed = perf_counter() - started
        status = outcome.status // 100
        labels = (
            # The model the request resolved to, once it did (an alias counts as its model).
            outcome.ledger_model or self.model_label(outcome.model),
            outcome.backend,
            key.name if key is not None else "-",
            STATUS_CLASSES[status] if 0 <= status < 6 else "5xx",
        )
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = Series()
        series.requests += 1.0
        if outcome.prompt_tokens:
            series.prompt += outcome.prompt_tokens
        if outcome.completion_tokens:
            series.completion += outcome.completion_tokens
        series.duration_sum += elapsed
        series.duration_buckets[bucket(DURATION_BUCKETS, elapsed)] += 1
        if outcome.upstream_seconds:
            overhead = max(0.0, elapsed - outcome.upstream_seconds)
            series.overhead_sum += overhead
            series.overhead_count += 1.0
            series.overhead_buckets[bucket(OVERHEAD_BUCKETS, overhead)] += 1
            if outcome.first_byte_at:
                ttft = outcome.first_byte_at - started
                series.ttft_sum += ttft
                series.ttft_count += 1.0
                series.ttft_buckets[bucket(TTFT_BUCKETS, ttft)] += 1
        if outcome.queued:
            waits = self.queue_waits.get(labels[:1])
            if waits is None:
                waits = self.queue_waits[labels[:1]] = [0.0] * (len(QUEUE_BUCKETS) + 3)
            waits[0] += outcome.queued
            waits[1] += 1.0
            waits[2 + bucket(QUEUE_BUCKETS, outcome.queued)] += 1.0
        if outcome.status == 429 and outcome.error_type in RATE_LIMIT_KINDS:
            limited = (labels[2], RATE_LIMIT_KINDS[outcome.error_type])
            self.rate_limited[limited] = self.rate_limited.get(limited, 0.0) + 1

    def upstream_error(self, model: str, backend: str, kind: str) -> None:
        """A backend failed: kind is connect, connect_timeout, timeout, protocol or mid_stream."""
        if not self.enabled:
            return
        labels = (self.model_label(model), backend, kind)
        self.upstream_errors[labels] = self.upstream_errors.get(labels, 0.0) + 1
