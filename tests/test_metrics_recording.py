"""Recording on the request path (metrics/recording.py): a request's figures land in the flat layout
that the copies, the snapshots and the Prometheus text read, in the buckets bisect would choose.
(The figures through a running gateway and a real Prometheus: test_gateway_metrics.py.)"""

from __future__ import annotations

from bisect import bisect_left
from time import perf_counter

import pytest

from vllm_gateway.metrics.recording import (
    COMPLETION,
    DURATION_AT,
    DURATION_BUCKETS,
    OVERHEAD_AT,
    OVERHEAD_BUCKETS,
    OVERHEAD_COUNT,
    PROMPT,
    QUEUE_BUCKETS,
    REQUESTS,
    SERIES_SIZE,
    TTFT_AT,
    TTFT_BUCKETS,
    TTFT_COUNT,
    Metrics,
    bucket,
)
from vllm_gateway.outcome import Outcome
from vllm_gateway.registry import Registry


@pytest.mark.parametrize("bounds", [DURATION_BUCKETS, TTFT_BUCKETS, OVERHEAD_BUCKETS, QUEUE_BUCKETS])
def test_a_value_falls_in_the_bucket_bisect_left_finds(bounds: tuple[float, ...]) -> None:
    values = [-1.0, 0.0, *bounds, *(bound * 0.999 for bound in bounds), *(bound * 1.001 for bound in bounds), 1e9]
    assert [bucket(bounds, value) for value in values] == [bisect_left(bounds, value) for value in values]


def test_a_request_lands_in_the_flat_layout_the_copies_and_the_text_read() -> None:
    metrics = Metrics(Registry())
    outcome = Outcome([])
    outcome.status, outcome.ledger_model, outcome.backend = 200, "chat", "chat-0"
    outcome.prompt_tokens, outcome.completion_tokens = 7, 11
    started = perf_counter() - 0.3  # 0.3 s ago: in the (0.25, 0.5] duration bucket
    outcome.upstream_seconds = 0.2995  # so the gateway's own part is about half a millisecond
    outcome.first_byte_at = started + 0.04  # its first bytes after 40 ms

    metrics.request(outcome, None, started)
    metrics.request(outcome, None, started)

    figures = metrics.series[("chat", "chat-0", "-", "2xx")].figures()
    assert len(figures) == SERIES_SIZE
    assert (figures[REQUESTS], figures[PROMPT], figures[COMPLETION]) == (2.0, 14.0, 22.0)
    assert (figures[TTFT_COUNT], figures[OVERHEAD_COUNT]) == (2.0, 2.0)
    duration = figures[DURATION_AT:TTFT_AT]
    assert duration[DURATION_BUCKETS.index(0.5)] == 2.0 and sum(duration) == 2.0
    ttft = figures[TTFT_AT:OVERHEAD_AT]
    assert ttft[TTFT_BUCKETS.index(0.05)] == 2.0 and sum(ttft) == 2.0
    overhead = figures[OVERHEAD_AT:]
    assert len(overhead) == len(OVERHEAD_BUCKETS) + 1 and sum(overhead) == 2.0
