"""The simulator's aiohttp application: its routes and the front door every request goes through.

The front door records the request, checks --api-key like vLLM and answers errors in vLLM's shapes.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from . import control, embeddings, generation, responses, server_info, sleep_api, tokenizer, transcriptions
from .config import SimulatorConfig
from .errors import ApiError, json_response
from .faults import Faults
from .state import STATE, SimulatorState

SIMULATOR_HEADER = "x-vllm-simulator"


@web.middleware
async def front_door(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record the request, enforce --api-key like vLLM (only under /v1), turn errors into JSON."""
    state = request.app[STATE]
    path = request.path
    if not path.startswith("/_simulator/"):
        request["record"] = state.record(request)
    key = state.config.api_key
    if (
        key is not None
        and path.startswith("/v1")
        and request.method != "OPTIONS"
        and request.headers.get("Authorization") != "Bearer " + key
    ):
        return json_response({"error": "Unauthorized"}, status=401)
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPException as exc:
        if exc.status in (404, 405):  # FastAPI's shape, as vLLM answers unknown routes
            return json_response({"detail": exc.reason}, status=exc.status)
        if 400 <= exc.status < 500:  # aiohttp's own refusals, e.g. 413 for a body over the limit
            return ApiError(exc.status, exc.text or exc.reason).response()
        raise


async def _label_response(request: web.Request, response: web.StreamResponse) -> None:
    # Every answer says it is simulated, so a demo or a log can never pass it off as vLLM's.
    response.headers[SIMULATOR_HEADER] = "1"


def create_app(config: SimulatorConfig, faults: Faults | None = None) -> web.Application:
    app = web.Application(middlewares=[front_door], client_max_size=64 * 1024 * 1024)
    app[STATE] = SimulatorState(config, faults or Faults())
    app.on_response_prepare.append(_label_response)
    app.router.add_get("/health", server_info.health)
    app.router.add_get("/version", server_info.version)
    app.router.add_get("/metrics", server_info.metrics)
    app.router.add_get("/v1/models", server_info.models)
    app.router.add_post("/v1/chat/completions", generation.chat_completions)
    app.router.add_post("/v1/completions", generation.completions)
    app.router.add_post("/v1/responses", responses.responses)
    app.router.add_post("/v1/embeddings", embeddings.embeddings)
    app.router.add_post("/v1/audio/transcriptions", transcriptions.transcriptions)
    app.router.add_post("/tokenize", tokenizer.tokenize)
    app.router.add_post("/detokenize", tokenizer.detokenize)
    if config.dev_mode:  # vLLM attaches its development routes only then; elsewhere they are 404
        app.router.add_post("/sleep", sleep_api.sleep)
        app.router.add_post("/wake_up", sleep_api.wake_up)
        app.router.add_get("/is_sleeping", sleep_api.is_sleeping)
    app.router.add_get("/_simulator/faults", control.get_faults)
    app.router.add_post("/_simulator/faults", control.set_faults)
    app.router.add_delete("/_simulator/faults", control.clear_faults)
    app.router.add_post("/_simulator/exit", control.exit_process)
    app.router.add_get("/_simulator/stats", control.get_stats)
    app.router.add_delete("/_simulator/stats", control.reset_stats)
    return app
