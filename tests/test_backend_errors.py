"""How an error body in another shape than OpenAI's is read (backend_errors.foreign_error); the tests
through the gateway are in test_gateway_streaming.py and test_gateway_upstream.py."""

from __future__ import annotations

import pytest

from vllm_gateway.backend_errors import MAX_MESSAGE_CHARS, foreign_error

JSON = b"application/json"
DETAILS = '{"detail": [{"loc": ["body", "n"], "msg": "bad"}]}'


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"message": "bad", "type": "BadRequestError", "param": null, "code": 400}}',
        b'{"error":{"message":""}}',
    ],
)
def test_an_error_in_openais_shape_is_left_alone(body: bytes) -> None:
    assert foreign_error(400, JSON, body, whole=True) is None


def test_the_start_of_a_long_error_in_openais_shape_is_enough_to_leave_it_alone() -> None:
    assert foreign_error(400, JSON, b' {\n "error" : {"message": "' + b"x" * 100, whole=False) is None


@pytest.mark.parametrize(
    "status, body, expected",
    [
        # vLLM's answer to a wrong key of its own (--api-key)
        (401, b'{"error": "Unauthorized"}', ("Unauthorized", "invalid_request_error", None, "unauthorized")),
        (404, b'{"detail": "Not Found"}', ("Not Found", "invalid_request_error", None, "not_found")),
        (
            400,
            b'{"object": "error", "message": "too long", "type": "BadRequestError", "param": "messages", "code": 400}',
            ("too long", "BadRequestError", "messages", 400),
        ),
        # FastAPI's 422: its list of problems, quoted as written
        (422, DETAILS.encode(), (DETAILS, "invalid_request_error", None, "unprocessable_entity")),
        (429, b'{"error": {"code": "busy"}}', ('{"error": {"code": "busy"}}', "rate_limit_error", None, "busy")),
        (503, b"", ("Service Unavailable", "server_error", None, "service_unavailable")),
        (500, b"Internal\n  Server   Error", ("Internal Server Error", "server_error", None, "internal_server_error")),
        (599, b"[1, 2]", ("[1, 2]", "server_error", None, "error")),
    ],
)
def test_an_error_in_another_shape_keeps_its_message_and_gets_a_type_and_code(
    status: int, body: bytes, expected: tuple[object, ...]
) -> None:
    error = foreign_error(status, JSON, body, whole=True)
    assert error is not None
    assert (error.status, error.message, error.type, error.param, error.code) == (status, *expected)


def test_a_long_text_is_quoted_from_its_start() -> None:
    error = foreign_error(500, b"text/plain", b"word " * 1000, whole=True)
    assert error is not None and error.message == ("word " * 1000)[:MAX_MESSAGE_CHARS] + "..."
    cut = foreign_error(500, b"text/plain", b"short, but not read to its end", whole=False)
    assert cut is not None and cut.message == "short, but not read to its end..."
