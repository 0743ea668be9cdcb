"""Errors answered in vLLM's OpenAI shape, {"error": {message, type, param, code}}, and the JSON answer.

Handlers raise ApiError; the front door (app.py) turns it into the response.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web


class ApiError(Exception):
    """An error answered in vLLM's OpenAI shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    @property
    def type(self) -> str:
        # vLLM names the type after the status phrase: 404 -> NotFoundError, 500 -> InternalServerError.
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            return "InternalServerError"
        name = phrase.replace(" ", "").replace("-", "")
        return name if name.endswith("Error") else name + "Error"

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        return json_response(body, status=self.status)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def invalid(param: str, expected: str) -> ApiError:
    """A 400 naming the offending field, as vLLM's request validation answers."""
    return bad_request(f"`{param}` must be {expected}.", param)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
