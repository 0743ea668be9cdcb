"""GPU memory: every local model on a GPU takes its gpu_memory_utilization share of that GPU's memory,
so per GPU the shares of all the config's models must add up to 1.0 at most.
"""

from __future__ import annotations

from .config import ModelSpec

VLLM_DEFAULT_FRACTION = "0.9"  # what vLLM takes when --gpu-memory-utilization is not given
TOLERANCE = 1e-9  # 0.325 + 0.325 + 0.155 + 0.155 may not add up to exactly 0.96 in binary


def memory_fraction_problems(models: list[ModelSpec]) -> list[str]:
    """One line per GPU over 1.0, in GPU order, naming each model's share as written."""
    totals: dict[str, float] = {}
    shares: dict[str, str] = {}
    for model in models:
        if model.is_remote or model.device != "gpu":
            continue
        fraction = model.gpu_memory_utilization or VLLM_DEFAULT_FRACTION
        for gpu in filter(None, model.gpus.split(",")):
            totals[gpu] = totals.get(gpu, 0.0) + float(fraction)
            shares[gpu] = shares.get(gpu, "") + f" {model.id}={fraction}"
    return [
        f"GPU {gpu}: gpu_memory_utilization adds up to {totals[gpu]:.3f} > 1.0 ({shares[gpu]} )"
        for gpu in sorted(totals, key=lambda gpu: (int(gpu), gpu))
        if totals[gpu] > 1.0 + TOLERANCE
    ]
