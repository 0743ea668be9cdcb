"""Errors answered in vLLM's OpenAI shape, {"error": {message, type, param, code}}, and the JSON answer.

Handlers raise ApiError; the front door (app.py) turns it into the response. An injected fault
(faults.py) may ask for another shape, one of those a client can get from behind a gateway.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

# "openai": vLLM's own. "detail": FastAPI's, as uvicorn answers an unknown route. "object": the
# top-level {"object": "error", "message", ...} of some vLLM versions. "text": a plain-text page.
# "html": a proxy's error page.
ERROR_SHAPES = ("openai", "detail", "object", "text", "html")


class ApiError(Exception):
    """An error answered in vLLM's OpenAI shape: {"error": {message, type, param, code}}, or in one of
    ERROR_SHAPES."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        shape: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.shape = shape
        self.error_type = error_type

    @property
    def type(self) -> str:
        if self.error_type is not None:  # a path of vLLM's that names it otherwise
            return self.error_type
        # vLLM names the type after the status phrase: 404 -> NotFoundError, 500 -> InternalServerError.
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            return "InternalServerError"
        name = phrase.replace(" ", "").replace("-", "")
        return name if name.endswith("Error") else name + "Error"

    def response(self) -> web.Response:
        fields = {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        if self.shape == "detail":
            return json_response({"detail": self.message}, status=self.status)
        if self.shape == "object":
            return json_response({"object": "error", **fields}, status=self.status)
        if self.shape == "text":
            return web.Response(text=self.message, status=self.status)
        if self.shape == "html":
            title = f"{self.status} {self.type}"
            page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1><p>{self.message}</p></body></html>"
            return web.Response(text=page, status=self.status, content_type="text/html")
        return json_response({"error": fields}, status=self.status)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def invalid(param: str, expected: str) -> ApiError:
    """A 400 naming the offending field, as vLLM's request validation answers."""
    return bad_request(f"`{param}` must be {expected}.", param)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
