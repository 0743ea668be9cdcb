"""OpenAI-shaped errors: the one place that knows `{"error": {"message", "type", "param", "code"}}`,
what each situation the gateway reports answers (the constructors below), how long a client should
wait before it retries, and the reason phrase of each status."""

from __future__ import annotations

import time
from collections.abc import Sequence
from http import HTTPStatus

import orjson

Headers = Sequence[tuple[bytes, bytes]]

# The reason phrase of each status, as bytes: the status line of every answer takes it as it is
# (server/exchange.py), and a backend's error without a type or code is named after it (backend_error).
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def retry_after_header(seconds: int) -> tuple[bytes, bytes]:
    return (b"retry-after", str(seconds).encode())


# For refusals that usually clear within a second: a saturated gateway or model, a key at its
# parallel cap, a store that is away.
RETRY_SOON = retry_after_header(1)


class GatewayError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        code: str | int | None = None,
        param: str | None = None,
        headers: Headers = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = list(headers)

    def body(self) -> bytes:
        return orjson.dumps(self.body_dict())

    def body_dict(self) -> dict[str, dict[str, object]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """The last event of a stream whose backend failed: an error the SDKs raise, then the end marker."""
    return b"data: " + GatewayError(502, message, "server_error", code).body() + b"\n\ndata: [DONE]\n\n"


# Constructors, one per situation the gateway reports. Statuses follow OpenAI's API where it has one.


def invalid_api_key() -> GatewayError:
    return GatewayError(
        401,
        "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>' or '?api_key=<key>'.",
        "invalid_request_error",
        "invalid_api_key",
    )


def key_disabled() -> GatewayError:
    return GatewayError(401, "This API key is disabled.", "invalid_request_error", "invalid_api_key")


def key_expired(expires_at: float) -> GatewayError:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires_at))
    return GatewayError(401, f"This API key expired at {when}.", "invalid_request_error", "key_expired")


def forbidden(message: str) -> GatewayError:
    return GatewayError(403, message, "permission_error", "forbidden")


def console_session_invalid() -> GatewayError:
    return GatewayError(
        401,
        "The console session has ended or is not valid. Sign in again at /console/sign-in.",
        "invalid_request_error",
        "invalid_session",
    )


def csrf_failed(how: str) -> GatewayError:
    """A console session's request that changes something, sent `how` (console/session.py)."""
    return GatewayError(403, f"Refused: a change sent with a console session {how}.", "permission_error", "csrf_failed")


def too_many_sign_ins(limit: str) -> GatewayError:
    return GatewayError(
        429,
        f"Too many console sign-in attempts from this address ({limit}). Wait a minute and try again.",
        "rate_limit_error",
        "rate_limit_exceeded",
        headers=[retry_after_header(60)],
    )


def admin_required() -> GatewayError:
    return GatewayError(403, "This endpoint needs an admin API key.", "permission_error", "admin_required")


def missing_model() -> GatewayError:
    return GatewayError(
        400,
        "You must provide a model parameter naming one of the models from GET /v1/models.",
        "invalid_request_error",
        "missing_model",
        "model",
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist or this API key may not use it.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def not_found(message: str) -> GatewayError:
    return GatewayError(404, message, "invalid_request_error", "not_found")


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", code, param)


def body_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"The request body is larger than the limit of {limit} bytes.", "invalid_request_error", "body_too_large"
    )


def request_timeout(what: str, seconds: float) -> GatewayError:
    return GatewayError(
        408, f"The {what} did not arrive within {seconds:g} s.", "invalid_request_error", "request_timeout"
    )


def request_line_too_long(limit: int) -> GatewayError:
    return GatewayError(
        414,
        f"The request line is longer than the limit of {limit} bytes.",
        "invalid_request_error",
        "request_line_too_long",
    )


def head_too_large(what: str) -> GatewayError:
    return GatewayError(
        431, f"The request head is too large: {what}.", "invalid_request_error", "request_header_too_large"
    )


def rate_limited(limit: str, retry_after: int, headers: Headers) -> GatewayError:
    return GatewayError(
        429,
        f"Rate limit reached for this API key ({limit}). Try again in {retry_after} s.",
        "rate_limit_error",
        "rate_limit_exceeded",
        headers=[*headers, retry_after_header(retry_after)],
    )


def tokens_limited(limit: str, retry_after: int, headers: Headers) -> GatewayError:
    """A key whose token window is used up: type `tokens`, as OpenAI's own token limits say."""
    return GatewayError(
        429,
        f"Token limit reached for this API key ({limit} tokens). Try again in {retry_after} s.",
        "tokens",
        "rate_limit_exceeded",
        headers=[*headers, retry_after_header(retry_after)],
    )


def overloaded(limit: int) -> GatewayError:
    return GatewayError(
        503,
        f"The gateway is at its limit of {limit} concurrent requests. Try again shortly.",
        "server_error",
        "gateway_overloaded",
        headers=[RETRY_SOON],
    )


def model_unavailable(model: str, state: str) -> GatewayError:
    """No server of `model` is ready. `state` is the model's registry.BackendState, taken as the str
    it is: importing the registry would pull the settings into every importer of errors.py, the body
    parser's helper process included. A client waits longer while a server loads its weights than
    when the servers are down, which the next health check may find back."""
    retry_after = 10 if state in ("loading", "restarting") else 5
    return GatewayError(
        503,
        f"The model `{model}` has no ready server right now ({state}). Try again in {retry_after} s.",
        "server_error",
        "model_not_ready",
        "model",
        headers=[retry_after_header(retry_after)],
    )


def body_parser_unavailable() -> GatewayError:
    """The helper process that parses large bodies died under this one (body_parser.py)."""
    return GatewayError(
        503, "The gateway could not parse this body now; try again.", "server_error", "body_parser_unavailable"
    )


def internal_error() -> GatewayError:
    """A bug: the request's handler ended without an answer (server/exchange.py)."""
    return GatewayError(500, "The gateway failed on this request; its log has the details.", "server_error")


def backend_error(
    status: int, message: str, type: str | None = None, param: str | None = None, code: str | int | None = None
) -> GatewayError:
    """An error a backend answered in another shape than OpenAI's (backend_errors.py): its status and
    what it said, with the type and code its body gave, else ones its status implies (404 gives
    `invalid_request_error` and `not_found`, 502 `server_error` and `bad_gateway`)."""
    phrase = REASONS.get(status, b"Error").decode()
    if type is None:
        type = {403: "permission_error", 429: "rate_limit_error"}.get(status) or (
            "server_error" if status >= 500 else "invalid_request_error"
        )
    if code is None:
        code = phrase.lower().replace(" ", "_").replace("-", "_")
    return GatewayError(status, message or phrase, type, code, param)


def store_unavailable(consequence: str) -> GatewayError:
    """Redis, where several workers keep the counts they share, did not answer: no fault of the
    request and usually over within seconds (a restart), so 503 with Retry-After, like an overloaded
    server. `consequence` says what it cost this request."""
    return GatewayError(
        503,
        f"The gateway's shared store (Redis) did not answer, so {consequence}. Try again in 1 s.",
        "server_error",
        "store_unavailable",
        headers=[RETRY_SOON],
    )


def upstream_unreachable(model: str) -> GatewayError:
    return GatewayError(
        502, f"No server of model `{model}` accepted the request.", "server_error", "upstream_unreachable", "model"
    )


def upstream_failed(model: str, error: Exception) -> GatewayError:
    """The backend broke off the exchange: it closed the connection, or sent what is not HTTP."""
    return GatewayError(
        502, f"The server of model `{model}` failed: {error}.", "server_error", "upstream_error", "model"
    )


def upstream_timeout(model: str, seconds: float) -> GatewayError:
    return GatewayError(
        504,
        f"The server of model `{model}` sent nothing for {seconds:g} s.",
        "server_error",
        "upstream_timeout",
        "model",
    )


# -- admission (admission/local.py) --


def too_many_parallel_requests(limit: int) -> GatewayError:
    """A key with `limit` requests in flight and waiting already: the key's own limit, so 429."""
    return GatewayError(
        429,
        f"This API key has {limit} requests in flight or waiting, its limit. Wait for one to finish.",
        "rate_limit_error",
        "parallel_requests_exceeded",
        headers=[RETRY_SOON],
    )


def queue_full(model: str, limit: int) -> GatewayError:
    """The model's servers are all busy and `limit` requests wait already: the server is saturated
    (not the key over a limit of its own), so 503, as OpenAI answers an overloaded engine."""
    return GatewayError(
        503,
        f"Every server of model `{model}` is busy and {limit} requests are waiting already. Try again shortly.",
        "server_error",
        "queue_full",
        "model",
        headers=[RETRY_SOON],
    )


def queue_timeout(model: str, seconds: float) -> GatewayError:
    return GatewayError(
        503,
        f"Every server of model `{model}` stayed busy for {seconds:g} s while this request waited. Try again shortly.",
        "server_error",
        "queue_timeout",
        "model",
        headers=[RETRY_SOON],
    )


# -- the admin API (api.py) and the metrics (metrics_http.py) --


def conflict(message: str, code: str) -> GatewayError:
    """An action that makes no sense in the current state (a model already running, ...)."""
    return GatewayError(409, message, "invalid_request_error", code)


def fleet_script_failed(message: str) -> GatewayError:
    return GatewayError(500, message, "server_error", "fleet_script_failed")


def fleet_action_failed(message: str) -> GatewayError:
    """The supervisor did not sleep or wake a model as asked (fleet_control.py)."""
    return GatewayError(500, message, "server_error", "fleet_action_failed")


def last_admin_key(message: str) -> GatewayError:
    return GatewayError(409, message, "invalid_request_error", "last_admin_key")


def key_file_invalid(message: str) -> GatewayError:
    return GatewayError(503, message, "server_error", "key_file_invalid")


def usage_ledger_off() -> GatewayError:
    return GatewayError(
        404, "The usage ledger is off (GATEWAY_USAGE_LEDGER).", "invalid_request_error", "usage_ledger_off"
    )


def metrics_forbidden() -> GatewayError:
    return GatewayError(
        403,
        "Metrics are answered to the networks in GATEWAY_METRICS_ALLOW and to admin keys.",
        "permission_error",
        "metrics_forbidden",
    )


# -- refusals of the web framework (app.py): a wrong method, a body it cannot parse --

# OpenAI's errors always carry a code; the framework's own get one here.
FRAMEWORK_ERROR_CODES = {400: "invalid_request", 405: "method_not_allowed", 413: "body_too_large"}


def framework_error(status: int, detail: str) -> GatewayError:
    return GatewayError(status, detail, "invalid_request_error", FRAMEWORK_ERROR_CODES.get(status, "invalid_request"))


def method_not_allowed() -> GatewayError:
    return framework_error(405, "Method Not Allowed")
