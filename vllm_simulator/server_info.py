"""What health checkers and the gateway poll: /health, /version, /v1/models and Prometheus /metrics.

Shapes and metric names are vLLM's, so the gateway's health checks and metric readers work unchanged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from aiohttp import web

from .errors import json_response
from .state import STATE, SimulatorState

SIMULATED_VLLM_VERSION = "0.32.0"
OWNED_BY = "vllm-simulator"


async def health(request: web.Request) -> web.Response:
    faults = request.app[STATE].faults
    if faults.slow_health:
        await asyncio.sleep(faults.slow_health)
    return web.Response(status=faults.health_status or 200)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cards = [
        {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": OWNED_BY,
            "root": state.config.model_path,
            "parent": None,
            "max_model_len": state.config.max_model_len,
            "permission": [
                {
                    "id": "modelperm-" + uuid.uuid4().hex,
                    "object": "model_permission",
                    "created": state.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
        for name in state.config.served_model_names
    ]
    return json_response({"object": "list", "data": cards})


async def version(request: web.Request) -> web.Response:
    return json_response({"version": SIMULATED_VLLM_VERSION + "+simulator"})


_METRICS: tuple[tuple[str, str, str, Callable[[SimulatorState], float]], ...] = (
    ("vllm:num_requests_running", "gauge", "Requests generating now (simulated engine).", lambda s: s.running),
    ("vllm:num_requests_waiting", "gauge", "Requests queued beyond max-num-seqs (simulated).", lambda s: s.waiting),
    (
        "vllm:kv_cache_usage_perc",
        "gauge",
        "Fraction of sequence slots in use (simulated).",
        lambda s: s.running / s.config.max_num_seqs,
    ),
    ("vllm:prompt_tokens_total", "counter", "Prompt tokens processed (simulated).", lambda s: s.prompt_tokens),
    ("vllm:generation_tokens_total", "counter", "Tokens generated (simulated).", lambda s: s.generation_tokens),
    ("vllm:request_success_total", "counter", "Requests finished normally (simulated).", lambda s: s.completed),
)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    label = '{model_name="%s"}' % state.primary_name.replace("\\", "\\\\").replace('"', '\\"')
    lines = []
    for name, kind, help_text, value in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{label} {float(value(state))}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")
