"""Finding the model a request body addresses, without changing a byte of the body."""

from __future__ import annotations

import re

import orjson

from . import errors
from .errors import GatewayError

MULTIPART_MODEL = re.compile(rb'Content-Disposition:[^\r\n]*\bname="model"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n', re.I)


class ClientDisconnected(Exception):
    """The client went away before its request was complete."""


def model_from_body(body: bytes, content_type: bytes) -> str:
    if content_type.startswith(b"multipart/form-data"):
        return model_from_multipart(body, content_type)
    model, problem = json_model(body)
    if problem is not None:
        raise errors.bad_request(problem, code="invalid_json")
    return require_model(model)


def json_model(body: bytes) -> tuple[object, str | None]:
    """The `model` of a JSON body, or why the body is not a JSON object. Plain values, not errors, so
    that it can run in a helper process (body_parser.py) and send its answer back."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        return None, f"The request body is not valid JSON: {error}"
    if not isinstance(payload, dict):
        return None, "The request body must be a JSON object."
    return payload.get("model"), None


def model_from_multipart(body: bytes, content_type: bytes) -> str:
    boundary = re.search(rb'boundary="?([^";]+)"?', content_type)
    match = MULTIPART_MODEL.search(body) if boundary else None
    if not match:
        return require_model(None)
    end = body.find(b"\r\n--" + boundary.group(1), match.end())
    if end < 0:
        return require_model(None)
    try:
        return require_model(body[match.end() : end].decode())
    except UnicodeDecodeError:
        return require_model(None)


def require_model(model: object) -> str:
    if not isinstance(model, str) or not model:
        raise GatewayError(
            400,
            "You must provide a model parameter naming one of the models from GET /v1/models.",
            "invalid_request_error",
            "missing_model",
            "model",
        )
    return model
