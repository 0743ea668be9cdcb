"""What recording a relayed request's metrics costs, in microseconds of CPU (docs/metrics.md).

    .venv/bin/python benchmarks/metrics_cost.py

Times Metrics.request for a finished stream (the costliest case: all three histograms) and the other
additions to the request path (two clock reads in the relay, the first-bytes check per upstream chunk).
"""

from __future__ import annotations

import timeit
from time import perf_counter

from vllm_gateway.keystore import KeyRecord
from vllm_gateway.metrics.recording import Metrics
from vllm_gateway.model_config import BackendSpec
from vllm_gateway.outcome import Outcome
from vllm_gateway.registry import Registry

ROUNDS = 200_000


def main() -> None:
    spec = BackendSpec(
        id="sim",
        name="sim",
        aliases=(),
        path="/models/sim",
        base_url="http://127.0.0.1:1",
        api_key=None,
        max_num_seqs=None,
    )
    metrics = Metrics(Registry([spec]))
    key = KeyRecord(id="key_0", name="alice", hash="0" * 64, prefix="sk-", admin=False, created_at=0.0)

    def record() -> None:
        started = perf_counter()
        outcome = Outcome([])
        outcome.status, outcome.key, outcome.model, outcome.backend = 200, "key_0(alice)", "sim", "sim"
        outcome.prompt_tokens, outcome.completion_tokens = 12, 128
        outcome.upstream_seconds, outcome.first_byte_at = 0.00001, started + 0.000005
        metrics.request(outcome, key, started)

    def baseline() -> None:
        started = perf_counter()
        outcome = Outcome([])
        outcome.status, outcome.key, outcome.model, outcome.backend = 200, "key_0(alice)", "sim", "sim"
        outcome.prompt_tokens, outcome.completion_tokens = 12, 128
        outcome.upstream_seconds, outcome.first_byte_at = 0.00001, started + 0.000005

    def clocks() -> None:
        first = perf_counter()
        first = perf_counter() - first

    best = {}
    for name, function in (("record", record), ("baseline", baseline), ("clocks", clocks)):
        best[name] = min(timeit.repeat(function, number=ROUNDS, repeat=5)) / ROUNDS * 1e6
    print(f"Metrics.request: {best['record'] - best['baseline']:.2f} us per request")
    print(f"relay's two clock reads: {best['clocks']:.2f} us per request")
    print(f"total: {best['record'] - best['baseline'] + best['clocks']:.2f} us per request")


if __name__ == "__main__":
    main()
