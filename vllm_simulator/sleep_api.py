"""vLLM's development routes for sleep mode: POST /sleep, POST /wake_up and GET /is_sleeping.

create_app (app.py) adds them only when VLLM_SERVER_DEV_MODE=1 was set at start, as vLLM does. The
query is checked as vLLM's FastAPI app checks it, and refused as vLLM refuses it: 400 in its error shape.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from .errors import ApiError, json_response
from .sleep import MAX_LEVEL, PAUSE_MODES, PauseMode
from .state import STATE

# The integers pydantic takes from a string: a sign, digits grouped by underscores, a zero fraction.
# No nested repetition, so a long query cannot make it backtrack.
_INTEGER = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0*)?", re.ASCII)
# vLLM bounds the value it echoes back in a validation error.
_MAX_ECHOED = 200
_EXPECTED_MODES = ", ".join(repr(mode) for mode in PAUSE_MODES[:-1]) + f" or {PAUSE_MODES[-1]!r}"


async def sleep(request: web.Request) -> web.Response:
    level, mode = sleep_query(request.query)
    await request.app[STATE].sleep.sleep(level, mode)
    return json_response({"status": "sleeping", "level": level})


async def wake_up(request: web.Request) -> web.Response:
    # vLLM takes the tags as they come, unchecked: an unknown one leaves the engine as it was.
    tags = request.query.getall("tags", []) or None
    fully_awake = await request.app[STATE].sleep.wake_up(tags)
    return json_response({"status": "awake" if fully_awake else "sleeping", "tags": tags})


async def is_sleeping(request: web.Request) -> web.Response:
    return json_response({"is_sleeping": request.app[STATE].sleep.is_sleeping})


def sleep_query(query: MultiMapping[str]) -> tuple[int, PauseMode]:
    """`level` (0..2, default 1) and `mode` (default abort), or the 400 vLLM answers for them."""
    errors: list[dict[str, Any]] = []
    level = 1
    if "level" in query:
        parsed = _level(_last(query, "level"))
        if isinstance(parsed, dict):
            errors.append(parsed)
        else:
            level = parsed
    mode: PauseMode = "abort"
    if "mode" in query:
        raw = _last(query, "mode")
        for known in PAUSE_MODES:
            if raw == known:
                mode = known
                break
        else:
            message = f"Input should be {_EXPECTED_MODES}"
            errors.append(_error("literal_error", "mode", message, raw, {"expected": _EXPECTED_MODES}))
    if errors:
        raise validation_error(errors)
    return level, mode


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """vLLM's answer to a request FastAPI's validation refused: each error's dict, as Python prints it."""
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "\n".join(f"  {error!r}" for error in errors)
    return ApiError(400, message, param=errors[0]["loc"], error_type="Bad Request")


def _level(raw: str) -> int | dict[str, Any]:
    text = raw.strip()
    value = None
    if _INTEGER.fullmatch(text):
        try:
            value = int(text.split(".")[0])
        except ValueError:  # more digits than Python converts
            value = None
    if value is None:
        message = "Input should be a valid integer, unable to parse string as an integer"
        return _error("int_parsing", "level", message, raw)
    if value < 0:
        return _error("greater_than_equal", "level", "Input should be greater than or equal to 0", raw, {"ge": 0})
    if value > MAX_LEVEL:
        message = f"Input should be less than or equal to {MAX_LEVEL}"
        return _error("less_than_equal", "level", message, raw, {"le": MAX_LEVEL})
    return value


def _error(kind: str, name: str, message: str, raw: str, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    echoed = raw if len(raw) <= _MAX_ECHOED else raw[:_MAX_ECHOED] + "...[truncated]"
    error: dict[str, Any] = {"type": kind, "loc": f"query.{name}", "msg": message, "input": echoed}
    if ctx is not None:
        error["ctx"] = ctx
    return error


def _last(query: MultiMapping[str], name: str) -> str:
    # A parameter given twice: FastAPI reads the last one, aiohttp's get() the first.
    return query.getall(name)[-1]
