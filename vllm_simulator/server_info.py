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
    model = state.primary_name.replace("\\", "\\\\").replace('"', '\\"')
    label = '{model_name="%s"}' % model
    lines = []
    for name, kind, help_text, value in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{label} {float(value(state))}"]
    lines += sleep_state_lines(state, model)
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


def sleep_state_lines(state: SimulatorState, model: str) -> list[str]:
    """vLLM's vllm:engine_sleep_state: one series per state, 1 for the engine's (present with or without
    sleep mode, as in vLLM; engine 0, since the simulator is one engine)."""
    sleep = state.sleep
    asleep, level = sleep.recorded_asleep, sleep.recorded_level
    values = {
        "awake": not asleep,
        "weights_offloaded": asleep and level == 1,
        "discard_all": asleep and level == 2,
    }
    name = "vllm:engine_sleep_state"
    lines = [
        f"# HELP {name} Engine sleep state (simulated): awake = 0 while asleep at any level, "
        "weights_offloaded = 1 at level 1, discard_all = 1 at level 2.",
        f"# TYPE {name} gauge",
    ]
    for sleep_state, value in values.items():
        labels = f'{{engine="0",model_name="{model}",sleep_state="{sleep_state}"}}'
        lines.append(f"{name}{labels} {float(value)}")
    return lines
