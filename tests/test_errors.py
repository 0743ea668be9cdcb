"""errors.py as the one owner of what the gateway answers: each named constructor's status, body and
headers as clients have always seen them, the Retry-After rule, and the one table of reason phrases.
The tests through the gateway are in the test_gateway_*.py and test_front_*.py files."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from vllm_gateway import errors
from vllm_gateway.errors import REASONS, GatewayError
from vllm_gateway.registry import BackendState
from vllm_gateway.server.exchange import error_response, status_line


def fields(
    status: int, message: str, type: str, code: str | None, param: str | None = None
) -> tuple[int, dict[str, object]]:
    return status, {"error": {"message": message, "type": type, "param": param, "code": code}}


RETRY_1 = [(b"retry-after", b"1")]


@pytest.mark.parametrize(
    "make, expected, headers",
    [
        (
            errors.missing_model,
            fields(
                400,
                "You must provide a model parameter naming one of the models from GET /v1/models.",
                "invalid_request_error",
                "missing_model",
                "model",
            ),
            [],
        ),
        (
            lambda: errors.upstream_failed("m", ConnectionResetError("reset by peer")),
            fields(502, "The server of model `m` failed: reset by peer.", "server_error", "upstream_error", "model"),
            [],
        ),
        (
            errors.body_parser_unavailable,
            fields(
                503,
                "The gateway could not parse this body now; try again.",
                "server_error",
                "body_parser_unavailable",
            ),
            [],
        ),
        (
            errors.internal_error,
            fields(500, "The gateway failed on this request; its log has the details.", "server_error", None),
            [],
        ),
        (
            lambda: errors.last_admin_key("the last admin key stays"),
            fields(409, "the last admin key stays", "invalid_request_error", "last_admin_key"),
            [],
        ),
        (
            lambda: errors.key_file_invalid("keys.json is not JSON"),
            fields(503, "keys.json is not JSON", "server_error", "key_file_invalid"),
            [],
        ),
        (
            errors.usage_ledger_off,
            fields(404, "The usage ledger is off (GATEWAY_USAGE_LEDGER).", "invalid_request_error", "usage_ledger_off"),
            [],
        ),
        (
            errors.metrics_forbidden,
            fields(
                403,
                "Metrics are answered to the networks in GATEWAY_METRICS_ALLOW and to admin keys.",
                "permission_error",
                "metrics_forbidden",
            ),
            [],
        ),
        (
            errors.method_not_allowed,
            fields(405, "Method Not Allowed", "invalid_request_error", "method_not_allowed"),
            [],
        ),
        (
            lambda: errors.overloaded(8),
            fields(
                503,
                "The gateway is at its limit of 8 concurrent requests. Try again shortly.",
                "server_error",
                "gateway_overloaded",
            ),
            RETRY_1,
        ),
        (
            lambda: errors.store_unavailable("it was not admitted"),
            fields(
                503,
                "The gateway's shared store (Redis) did not answer, so it was not admitted. Try again in 1 s.",
                "server_error",
                "store_unavailable",
            ),
            RETRY_1,
        ),
        (
            lambda: errors.rate_limited("2/minute", 17, [(b"x-ratelimit-limit-requests", b"2")]),
            fields(
                429,
                "Rate limit reached for this API key (2/minute). Try again in 17 s.",
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            [(b"x-ratelimit-limit-requests", b"2"), (b"retry-after", b"17")],
        ),
    ],
)
def test_each_named_constructor_answers_what_the_gateway_always_answered(
    make: Callable[[], GatewayError], expected: tuple[int, dict[str, object]], headers: list[tuple[bytes, bytes]]
) -> None:
    error = make()
    assert (error.status, orjson.loads(error.body())) == expected
    assert error.headers == headers


@pytest.mark.parametrize(
    "state, seconds", [(BackendState.LOADING, 10), (BackendState.DOWN, 5), (BackendState.UNKNOWN, 5)]
)
def test_a_model_without_a_ready_server_is_retried_after_10_s_while_loading_else_5(
    state: BackendState, seconds: int
) -> None:
    error = errors.model_unavailable("m", state)
    assert error.status == 503
    assert orjson.loads(error.body()) == {
        "error": {
            "message": f"The model `m` has no ready server right now ({state.value}). Try again in {seconds} s.",
            "type": "server_error",
            "param": "model",
            "code": "model_not_ready",
        }
    }
    assert error.headers == [(b"retry-after", str(seconds).encode())]


@pytest.mark.parametrize(
    "status, code",
    [(400, "invalid_request"), (405, "method_not_allowed"), (413, "body_too_large"), (422, "invalid_request")],
)
def test_the_frameworks_own_refusals_get_the_gateways_codes(status: int, code: str) -> None:
    error = errors.framework_error(status, "what the framework said")
    assert (error.status, error.message, error.type, error.code) == (
        status,
        "what the framework said",
        "invalid_request_error",
        code,
    )


@pytest.mark.parametrize("status, phrase", [(404, b"Not Found"), (502, b"Bad Gateway"), (599, None)])
def test_the_status_line_and_a_bare_backend_error_take_one_reason_phrase(status: int, phrase: bytes | None) -> None:
    assert REASONS.get(status) == phrase
    assert status_line(status) == b"HTTP/1.1 %d %s\r\n" % (status, phrase or b"")
    assert errors.backend_error(status, "").message == (phrase or b"Error").decode()
    assert error_response(errors.backend_error(status, "")).startswith(status_line(status))
