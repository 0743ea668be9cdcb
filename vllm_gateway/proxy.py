"""The request path for every model-addressed endpoint, top to bottom:
authenticate, read the body, find the model, rate-limit, pick a backend, relay, log.

Written against raw ASGI rather than FastAPI routing because it runs for every request and every
token: bytes from vLLM go to the client as they arrive, never parsed or re-serialised.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

from . import errors
from .access_log import clean
from .errors import GatewayError
from .keystore import KeyRecord
from .registry import Backend, BackendState, Model
from .request_body import ClientDisconnected, model_from_body, read_body
from .state import GatewayState
from .upstream import (
    Response,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    request_headers,
    response_headers,
)

PROXIED_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/score",
        "/v1/rerank",
        "/v2/rerank",
        "/tokenize",
        "/detokenize",
        "/score",
        "/rerank",
        "/pooling",
        "/classify",
    }
)

# A request that is still running after this long gets a task watching for its client to disconnect;
# most non-streamed requests are answered sooner and never pay for one (about 10 us each).
WATCH_AFTER_SECONDS = 0.005

REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')
COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


@dataclass
class Outcome:
    """What the log line says about one request; filled in as the request goes."""

    status: int = 500
    key: str = "-"
    model: str = "-"
    backend: str = "-"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    client_gone: bool = False
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class DisconnectWatch:
    """Cancels the request's task when its client disconnects, so the upstream request is closed."""

    __slots__ = ("receive", "task", "outcome", "timer", "future")

    def __init__(self, receive, outcome: Outcome) -> None:
        self.receive = receive
        self.task = asyncio.current_task()
        self.outcome = outcome
        self.future: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            WATCH_AFTER_SECONDS, self._start
        )

    def _start(self) -> None:
        self.timer = None
        self.future = asyncio.ensure_future(self.receive())
        self.future.add_done_callback(self._client_gone)

    def _client_gone(self, future: asyncio.Future) -> None:
        if not future.cancelled():
            self.outcome.client_gone = True
            self.task.cancel()

    def stop(self) -> None:
        """From here on a disconnect is the normal end of the exchange."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.future is not None:
            self.future.remove_done_callback(self._client_gone)
            self.future.cancel()
            self.future = None


def new_request_id() -> bytes:
    # Unique, not secret: the Mersenne Twister is far cheaper than os.urandom on some VMs.
    return b"%032x" % random.getrandbits(128)


async def handle(state: GatewayState, scope, receive, send) -> None:
    started = time.perf_counter()
    headers = dict(scope["headers"])
    request_id = headers.get(b"x-request-id", b"")
    if not REQUEST_ID.fullmatch(request_id):
        request_id = new_request_id()
    outcome = Outcome(headers=[(b"x-request-id", request_id)])
    try:
        await proxy(state, scope, receive, send, headers, request_id, outcome)
    except GatewayError as error:
        outcome.status = error.status
        await send_error(send, error, outcome.headers + error.headers)
    except ClientDisconnected:
        outcome.status = 499
    except UpstreamError:
        outcome.status = 502  # a body cut short after its headers went out; uvicorn drops the connection
        raise
    except asyncio.CancelledError:
        if not outcome.client_gone:
            raise
        asyncio.current_task().uncancel()
        outcome.status = 499
    finally:
        state.log.request(
            request_id.decode(), "POST", scope["path"], outcome.status, time.perf_counter() - started,
            outcome.key, outcome.model, outcome.backend, outcome.prompt_tokens, outcome.completion_tokens,
        )


async def proxy(state: GatewayState, scope, receive, send, headers, request_id: bytes, outcome: Outcome) -> None:
    # 1. Who is asking.
    key = authenticate(state, headers, scope["query_string"])
    outcome.key = f"{key.id}({clean(key.name)})"

    # 2. The whole body, within the size limit, and the model it names.
    length = headers.get(b"content-length")
    body = await read_body(receive, int(length) if length and length.isdigit() else None, state.settings.max_body_bytes)
    model_name = model_from_body(body, headers.get(b"content-type", b""))
    outcome.model = model_name
    model = state.registry.resolve(model_name)
    if model is None or not key.may_use(model.name):
        raise errors.model_not_found(model_name)

    # 3. Limits: this key's rate, then the gateway's concurrency.
    outcome.headers += await state.limiter.hit(key.id, key.rate_limit)
    if state.in_flight >= state.settings.concurrency_limit:
        raise errors.overloaded(state.settings.concurrency_limit)

    # 4. Relay, closing the upstream request the moment the client goes away.
    state.in_flight += 1
    watch = DisconnectWatch(receive, outcome)
    try:
        upstream_headers = request_headers(list(headers.items()), request_id)
        await relay(state, scope, send, upstream_headers, body, model, outcome, watch)
    finally:
        state.in_flight -= 1
        watch.stop()


def authenticate(state: GatewayState, headers, query_string: bytes) -> KeyRecord:
    secret = ""
    authorization = headers.get(b"authorization", b"")
    if authorization[:7].lower() == b"bearer ":
        secret = authorization[7:].strip().decode("latin-1")
    elif b"api_key=" in query_string:
        secret = dict(parse_qsl(query_string.decode("latin-1"))).get("api_key", "")
    record = state.keys.authenticate(secret) if secret else None
    if record is None:
        raise errors.invalid_api_key()
    if record.disabled:
        raise errors.key_disabled()
    return record


async def relay(state, scope, send, upstream_headers, body: bytes, model: Model, outcome: Outcome,
                watch: DisconnectWatch) -> None:
    upstream, backend = await open_upstream(state, scope, upstream_headers, body, model)
    outcome.backend = backend.spec.id
    finished = False
    try:
        outcome.status = upstream.status
        await send({"type": "http.response.start", "status": upstream.status,
                    "headers": response_headers(upstream) + outcome.headers})
        previous = last = b""
        try:
            while chunk := await upstream.read_chunk():
                previous, last = last, chunk
                if upstream.at_end:
                    break  # the common case of a whole JSON answer: one send instead of two
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as error:
            if b"text/event-stream" not in upstream.content_type:
                raise  # half a JSON body cannot be mended: the connection is dropped
            outcome.status = 502
            message = f"The server of model `{model.name}` failed during the stream: {error}."
            chunk = errors.sse_error_event(message)
        watch.stop()
        await send({"type": "http.response.body", "body": chunk, "more_body": False})
        finished = True
        record_usage(previous + last, outcome)
    finally:
        backend.in_flight -= 1
        if finished:
            upstream.release()
        else:
            upstream.close()  # tells vLLM the client is gone, so it aborts the generation


async def open_upstream(state: GatewayState, scope, upstream_headers, body: bytes,
                        model: Model) -> tuple[Response, Backend]:
    """Send the request to the least busy ready backend, moving on to the next one that refuses."""
    query = scope["query_string"]
    if b"api_key=" in query:
        query = urlencode([(k, v) for k, v in parse_qsl(query.decode("latin-1")) if k != "api_key"]).encode()
    path = scope["raw_path"] or scope["path"].encode()
    path = path.split(b"?", 1)[0] + (b"?" + query if query else b"")
    tried: list[Backend] = []
    timed_out = False
    while True:
        backend = model.pick(exclude=tried)
        if backend is None:
            if timed_out:
                raise errors.upstream_timeout(model.name, state.settings.connect_timeout)
            if tried:
                raise errors.upstream_unreachable(model.name)
            retry_after = 10 if model.state is BackendState.LOADING else 5
            raise errors.model_unavailable(model.name, model.state.value, retry_after)
        headers = upstream_headers
        if backend.spec.api_key:
            headers = [*headers, (b"authorization", b"Bearer " + backend.spec.api_key.encode())]
        backend.in_flight += 1
        try:
            return await state.upstream.request(b"POST", backend.base_url, path, headers, body), backend
        except UpstreamConnectError as error:
            # Nothing reached vLLM, so another replica may safely take the request.
            backend.in_flight -= 1
            timed_out = isinstance(error, UpstreamConnectTimeout)
            backend.mark(BackendState.DOWN, str(error))
            state.health.check_soon()
            tried.append(backend)
        except UpstreamTimeout:
            backend.in_flight -= 1
            raise errors.upstream_timeout(model.name, state.settings.read_timeout) from None
        except UpstreamError as error:
            backend.in_flight -= 1
            raise GatewayError(502, f"The server of model `{model.name}` failed: {error}.",
                               "server_error", "upstream_error", "model") from None
        except BaseException:
            backend.in_flight -= 1
            raise


def record_usage(tail: bytes, outcome: Outcome) -> None:
    start = tail.rfind(b'"usage"')
    if start < 0:
        return
    prompt = PROMPT_TOKENS.search(tail, start)
    completion = COMPLETION_TOKENS.search(tail, start)
    outcome.prompt_tokens = int(prompt.group(1)) if prompt else None
    outcome.completion_tokens = int(completion.group(1)) if completion else None


async def send_error(send, error: GatewayError, headers: list[tuple[bytes, bytes]]) -> None:
    body = error.body()
    await send({"type": "http.response.start", "status": error.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
