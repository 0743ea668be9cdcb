"""The simulator's own endpoints under /_simulator/: set or clear faults, read or reset the stats,
end the process as a crash would.

Not part of vLLM's API; tests and demos use them to make the engine fail and to see what it got.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import orjson
from aiohttp import web

from .errors import bad_request, json_response
from .faults import Faults
from .state import STATE, SimulatorState
from .validation import json_body

log = logging.getLogger(__name__)


async def get_faults(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].faults.active())


async def set_faults(request: web.Request) -> web.Response:
    """Replace the whole fault set with the posted one (null or absent = off)."""
    state = request.app[STATE]
    state.faults = Faults.parse(await json_body(request))
    log.warning("SIMULATOR: faults set to %s", state.faults.active())
    return json_response(state.faults.active())


async def clear_faults(request: web.Request) -> web.Response:
    request.app[STATE].faults = Faults()
    return json_response({})


async def exit_process(request: web.Request) -> web.Response:
    """Answer, then end the whole process: {"code": N} exits with N, {"signal": "SIGKILL"} dies of it,
    as a server crashing on its own would (a supervisor's tests)."""
    body = await json_body(request)
    if not isinstance(body, dict) or set(body) - {"code", "signal"} or len(body) != 1:
        raise bad_request('post {"code": N} or {"signal": "NAME"}')
    code, name = body.get("code"), body.get("signal")
    if name is not None and (not isinstance(name, str) or name not in signal.Signals.__members__):
        raise bad_request(f"signal must be a name such as SIGKILL, not {name!r}", "signal")
    if name is None and (isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255):
        raise bad_request("code must be a whole number from 0 to 255", "code")

    def end() -> None:
        if name is not None:
            os.kill(os.getpid(), signal.Signals[name])
        os._exit(int(code or 0))

    log.error("SIMULATOR: ending the process (%s), as asked", f"signal {name}" if name else f"exit code {code}")
    asyncio.get_running_loop().call_later(0.1, end)  # after the answer has left
    return json_response({"exiting": body}, status=202)


async def get_stats(request: web.Request) -> web.Response:
    return json_response(stats_of(request.app[STATE]))


async def reset_stats(request: web.Request) -> web.Response:
    request.app[STATE].reset_stats()
    return json_response({})


def stats_of(state: SimulatorState) -> dict[str, Any]:
    return {
        "requests": dict(state.requests),
        "running": state.running,
        "peak_running": state.peak_running,
        "waiting": state.waiting,
        "aborted": state.aborted,
        "completed": state.completed,
        "crashed": state.crashed,
        "prompt_tokens": state.prompt_tokens,
        "generation_tokens": state.generation_tokens,
        "sleep": state.sleep.stats(),
        "last_request": _encodable(state.last_request),
        "last_by_path": {path: _encodable(entry) for path, entry in state.last_by_path.items()},
    }


def _encodable(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """The entry, or a copy without its body when orjson cannot encode that body again.

    orjson decodes JSON nested up to 1024 levels but encodes only up to 254, so a body a client
    could send would otherwise make /_simulator/stats fail.
    """
    if entry is None:
        return None
    try:
        orjson.dumps(entry["body"])
    except orjson.JSONEncodeError:
        return {**entry, "body": "<not recorded: nested too deeply to encode again>"}
    return entry
