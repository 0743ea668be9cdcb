"""The request path for every model-addressed endpoint, top to bottom: what the HTTP server calls
(server_hooks: the check of each head, which finds the key, access.py; handle; the log of the answers
the server gives itself), then the key's limits, the body, the model, admission and a backend, the
relay, the answer's tokens, the log.

It runs for every request and every token, so it talks to the client's connection directly
(server.exchange.Exchange) rather than through ASGI: bytes from vLLM go to the client as they arrive,
never parsed or re-serialised, and a whole answer leaves in one write with its head.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from typing import Final
from urllib.parse import parse_qsl, urlencode

from . import backend_errors, errors, metrics_http
from .access import check_head
from .access_log import key_label
from .admission.local import Slot
from .errors import GatewayError
from .outcome import Outcome
from .prompt_count import COUNTED_PATHS, count_prompt
from .registry import Backend, BackendState, Model
from .request_body import model_from_body
from .server.exchange import ClientDisconnected, Exchange
from .server.hooks import ConnectionCap, Limits, ServerHooks
from .state import GatewayState
from .stream_usage import USAGE_PATHS, UsageMeter, with_usage_requested
from .upstream import (
    Headers,
    Response,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    request_headers,
    response_headers,
    without_length,
)
from .usage_scan import usage_in

PROXIED_PATHS: Final = frozenset(
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

# Endpoints that take no sequence in vLLM: admission sends them at once, full backend or not.
NO_SEQUENCE_PATHS: Final = frozenset({"/tokenize", "/detokenize"})

REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
KEY_SHAPED_ID: Final = re.compile(rb"sk-", re.I)


def new_request_id() -> bytes:
    # Unique, not secret: the Mersenne Twister is far cheaper than os.urandom on some VMs.
    return b"%032x" % random.getrandbits(128)


def server_hooks(state: GatewayState, limits: Limits, cap: ConnectionCap) -> ServerHooks:
    """What the HTTP server (server/protocol.py) calls: `check` when a request's head is complete,
    `handle` below for a model-addressed request that passed it, and `log_rejection` for a request the
    connection itself answered."""

    def check(exchange: Exchange) -> GatewayError | None:
        if exchange.path == metrics_http.METRICS_PATH:
            return metrics_http.check_head(state, exchange)
        return check_head(state.keys, exchange, state.sessions)

    def log_rejection(exchange: Exchange | None, status: int) -> None:
        key = exchange.key if exchange is not None else None
        state.log.request(
            new_request_id().decode(),
            exchange.method if exchange else "-",
            exchange.path if exchange else "-",
            status,
            0.0,
            key_label(key.id, key.name) if key is not None else "-",
        )

    # Closures and a partial, not wrapping coroutines: one call per head, one coroutine per request.
    return ServerHooks(PROXIED_PATHS, functools.partial(handle, state), check, log_rejection, limits, cap)


async def handle(state: GatewayState, exchange: Exchange) -> None:
    started = time.perf_counter()
    headers = dict(exchange.headers)
    request_id = headers.get(b"x-request-id", b"")
    # The id goes to vLLM and into both logs: one of a key's shape is replaced like a malformed one.
    if not REQUEST_ID.fullmatch(request_id) or KEY_SHAPED_ID.search(request_id):
        request_id = new_request_id()
    outcome = Outcome(headers=[(b"x-request-id", request_id)])
    try:
        await admit_and_relay(state, exchange, headers, request_id, outcome)
    except GatewayError as error:
        outcome.status = error.status
        # The metrics tell a key's cap of parallel requests (admission/local.py) from its rate limit.
        outcome.error_type = error.code if error.code == "parallel_requests_exceeded" else error.type
        send_error(exchange, error, outcome.headers)
    except ClientDisconnected:
        outcome.status = 499
    except UpstreamError as failure:  # a name of its own: mypyc types a name by its first binding
        # The backend failed mid-body: before the head went out the client gets a 502; after it, only a
        # dropped connection can say so (send_error does either).
        outcome.status = 502
        state.metrics.upstream_error(outcome.model, outcome.backend, upstream_error_kind(failure, "mid_body"))
        send_error(exchange, errors.upstream_failed(outcome.model, failure), outcome.headers)
    except asyncio.CancelledError:
        if not exchange.client_gone:
            raise
        task = asyncio.current_task()
        assert task is not None
        task.uncancel()
        outcome.status = 499
    finally:
        if outcome.sent is not None and outcome.prompt_tokens is None and exchange.path in COUNTED_PATHS:
            # Rare: vLLM had the request but its usage never came (the client left, the backend cut
            # the answer). Its prompt counts all the same; the client is not kept waiting.
            await count_prompt(state, exchange.path, request_id, outcome)
        # Those of an answer whose usage never came (or whose client left) count now.
        if outcome.token_limit:
            await count_tokens(state, outcome)
        state.metrics.request(outcome, exchange.key, started)
        if outcome.ledger_model and state.ledger is not None:
            state.ledger.record(
                outcome.key_id,
                outcome.ledger_model,
                outcome.prompt_tokens or 0,
                outcome.completion_tokens or 0,
                error=outcome.status >= 400 and outcome.status != 499,
                aborted=outcome.status == 499,
            )
        state.log.relayed(
            request_id.decode(),
            exchange.path,
            outcome.status,
            time.perf_counter() - started,
            outcome.key,
            outcome.model,
            outcome.backend,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.queued,
            outcome.prompt_from,
            outcome.wake,
        )


async def admit_and_relay(
    state: GatewayState, exchange: Exchange, headers: dict[bytes, bytes], request_id: bytes, outcome: Outcome
) -> None:
    # 1. Who is asking: the key was checked with the head (access.check_head), before any body.
    key = exchange.key
    assert key is not None
    outcome.key = key_label(key.id, key.name)
    limits = state.key_limits.of(key)  # its own limits, else the settings' (key_limits.py)

    # 2. This key's rate, before its body is read: a key at its limit cannot make the gateway parse.
    outcome.headers += await state.limiter.hit(key.id, limits.rate)
    # 2b. Its tokens: a key whose token window is used up is refused before anything goes upstream.
    token_limit = outcome.token_limit = limits.tokens
    if token_limit:
        outcome.headers += await state.limiter.check_tokens(key.id, token_limit)

    # 3. The whole body, within the size limit, and the model it names.
    body = await exchange.read_body()
    content_type = headers.get(b"content-type", b"")
    if state.body_parser.parses_inline(body, content_type):
        model_name, lacks_usage = model_from_body(body, content_type)
    else:
        model_name, lacks_usage = await state.body_parser.model_of(body, content_type)
    outcome.model = model_name
    model = state.registry.resolve(model_name)
    if model is None or not key.may_use(model.name):
        raise errors.model_not_found(model_name)
    if model_name not in model.served:
        # A name its servers were not started with (an alias added to the config since): they are
        # asked by the model's own name, which they all serve.
        body = await state.body_parser.with_model(body, content_type, model.name)
    outcome.key_id, outcome.ledger_model = key.id, model.name
    # A stream is counted even when its client did not ask for the usage: the gateway asks, and
    # keeps the usage chunk from that client (stream_usage.py).
    strip_usage = lacks_usage and exchange.path in USAGE_PATHS
    if strip_usage:
        body = with_usage_requested(body)

    # 4. The gateway's concurrency (requests waiting for a backend count too), then this key's
    # requests in flight and waiting (admission/local.py): its slot holds the key's count, and the
    # backend once one is chosen, and this `finally` alone gives them back.
    if state.in_flight >= state.settings.concurrency_limit:
        raise errors.overloaded(state.settings.concurrency_limit)
    slot = Slot(state.admission, limits, exchange.path in NO_SEQUENCE_PATHS)

    # 5. Relay, once admission gave a backend with room (open_upstream). When the client goes away,
    # its connection cancels this task: a waiting request leaves the queue, and a relayed one's
    # upstream connection is closed on the way out, which is how vLLM learns to abort the generation.
    state.in_flight += 1
    try:
        upstream_headers = request_headers(list(headers.items()), request_id)
        await relay(state, exchange, slot, upstream_headers, body, model, outcome, strip_usage)
    finally:
        state.in_flight -= 1
        slot.close()  # in flight until the last byte: now the next request may go


async def relay(
    state: GatewayState,
    exchange: Exchange,
    slot: Slot,
    upstream_headers: Headers,
    body: bytes,
    model: Model,
    outcome: Outcome,
    strip_usage: bool,
) -> None:
    # From here the metrics count the backend's time, admission's wait for one included, so that the
    # gateway's overhead is its own work only (the wait is in the log line, queue_ms).
    waiting_from = time.perf_counter()
    upstream, backend = await open_upstream(state, exchange, slot, upstream_headers, body, model, outcome)
    outcome.backend = backend.spec.id
    finished = False
    meter: UsageMeter | None = None
    try:
        outcome.status = upstream.status
        if upstream.status < 300:
            outcome.sent = (backend, body)  # vLLM took it: its tokens count, usage or not
        head = response_headers(upstream) + outcome.headers
        streaming = b"text/event-stream" in upstream.content_type
        first = b"" if streaming else await upstream.read_chunk()
        whole = upstream.at_end
        if upstream.status >= 400:
            # Every error reaches the client in OpenAI's shape, whatever shape its backend used.
            head, first, whole = await backend_errors.in_openai_shape(upstream, head, first)
        if whole:
            # A whole answer that came at once (JSON, usually): it leaves in one write with its head.
            outcome.prompt_tokens, outcome.completion_tokens = usage_in(first) or (None, None)
            if outcome.token_limit:
                await count_tokens(state, outcome)
            exchange.respond(upstream.status, head, first)
        else:
            # A stream, or a body still coming: the head at once, then every piece as it arrives,
            # through the meter, which finds the usage wherever the reads cut it (stream_usage.py).
            meter = UsageMeter(exchange, strip_usage and streaming and not upstream.encoded)
            if meter.strip and upstream.sized:
                head = without_length(head)  # the usage chunk leaves: the body is shorter than declared
            exchange.start(upstream.status, head, first)
            meter.feed(first)
            if streaming:
                meter.count_events(exchange.path)
            failure = b""
            try:
                # Every piece goes to the client as it arrives, written by the response alone
                # (upstream.Response.send_body_to), which returns once the body has all gone but
                # what tells the client it has the whole answer (stream_usage.UsageMeter.rest).
                await upstream.send_body_to(meter)
            except UpstreamError as error:
                if not (streaming and exchange.chunked):
                    raise  # half a body, or one of a fixed length, cannot be mended: the connection drops
                outcome.status = 502
                state.metrics.upstream_error(model.name, backend.spec.id, upstream_error_kind(error, "mid_stream"))
                failure = errors.sse_error_event(
                    f"The server of model `{model.name}` failed during the stream: {error}."
                )
            last = meter.rest(whole_events_only=bool(failure))
            outcome.prompt_tokens, outcome.completion_tokens = meter.tokens()
            meter = None  # read once only: reading the tokens counts the events still kept
            if outcome.token_limit and outcome.prompt_tokens is not None:
                await count_tokens(state, outcome)
            exchange.end(last + failure)
            if streaming:
                outcome.first_byte_at = upstream.first_body_at
        finished = True
    finally:
        if meter is not None:
            # The usage; without one (the client left, the backend cut the stream), what a stream delivered.
            outcome.prompt_tokens, outcome.completion_tokens = meter.tokens()
        outcome.upstream_seconds = time.perf_counter() - waiting_from
        if finished:
            upstream.release()
        else:
            upstream.close()  # tells vLLM the client is gone, so it aborts the generation


async def count_tokens(state: GatewayState, outcome: Outcome) -> None:
    """The answer's tokens (of a stream cut short, those delivered) against its key's token limit, in
    full, once. The relay counts them before the client has the answer's end, so that the next
    request the client sends on seeing it finds them counted. Called only for a key with a token
    limit: a coroutine costs about a microsecond, which the others need not pay."""
    tokens = (outcome.prompt_tokens or 0) + (outcome.completion_tokens or 0)
    if outcome.token_limit and tokens and not outcome.tokens_counted:
        outcome.tokens_counted = True
        await state.limiter.count_tokens(outcome.key_id, outcome.token_limit, tokens)


async def open_upstream(
    state: GatewayState,
    exchange: Exchange,
    slot: Slot,
    upstream_headers: Headers,
    body: bytes,
    model: Model,
    outcome: Outcome,
) -> tuple[Response, Backend]:
    """Send the request to the least busy ready backend with room (waiting for one when all are
    full, admission/local.py), moving on to the next one that refuses. The backend is the slot's
    from here: whatever fails, the slot's owner gives it back."""
    query = exchange.query_string
    if b"api_key=" in query:
        query = urlencode([(k, v) for k, v in parse_qsl(query.decode("latin-1")) if k != "api_key"]).encode()
    path = exchange.raw_path + (b"?" + query if query else b"")
    tried: list[Backend] = []
    timed_out = False
    while True:
        backend, waited = await state.admission.acquire(model, slot.key, tried, slot.at_once)
        slot.backend = backend  # the slot's from here, and given back by its owner whatever happens next
        if waited:
            outcome.queued = (outcome.queued or 0.0) + waited
        if backend is None:
            if timed_out:
                raise errors.upstream_timeout(model.name, state.settings.connect_timeout)
            if tried:
                raise errors.upstream_unreachable(model.name)
            raise errors.model_unavailable(model.name, model.state)
        if backend.spec.idles:  # the supervisor sleeps or stops it once unused (wake_on_demand.py)
            state.wakes.used(backend)
            if waited and backend.woke_at > time.perf_counter() - waited:
                outcome.wake = waited  # it came back while this request waited
        headers = [*upstream_headers, *backend.auth] if backend.auth else upstream_headers
        try:
            return await state.upstream.request(b"POST", backend.base_url, path, headers, body), backend
        except asyncio.CancelledError:
            if exchange.client_gone:
                outcome.sent = (backend, body)  # the client left while vLLM worked on it: the prompt counts
            raise
        # Each `except` names its own exception: mypyc types a name by its first binding.
        except UpstreamConnectError as unreachable:
            # Nothing reached vLLM, so another replica may safely take the request; this one's room
            # goes back first, as a slot holds one backend.
            slot.release()
            if state.health.went_dormant(backend):
                continue  # stopped as idle since the last health round: it wakes for this request
            timed_out = isinstance(unreachable, UpstreamConnectTimeout)
            state.metrics.upstream_error(model.name, backend.spec.id, upstream_error_kind(unreachable))
            if backend.mark(BackendState.DOWN, str(unreachable)):
                state.registry.changed()
            state.health.check_soon()
            tried.append(backend)
        except UpstreamTimeout as timeout:
            state.metrics.upstream_error(model.name, backend.spec.id, upstream_error_kind(timeout))
            raise errors.upstream_timeout(model.name, state.settings.read_timeout) from None
        except UpstreamError as failure:
            state.metrics.upstream_error(model.name, backend.spec.id, upstream_error_kind(failure))
            raise errors.upstream_failed(model.name, failure) from None


def upstream_error_kind(error: UpstreamError, otherwise: str = "protocol") -> str:
    if isinstance(error, UpstreamConnectTimeout):
        return "connect_timeout"
    if isinstance(error, UpstreamConnectError):
        return "connect"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    return otherwise


def send_error(exchange: Exchange, error: GatewayError, headers: list[tuple[bytes, bytes]]) -> None:
    if exchange.head_sent:
        exchange.abort()  # the client already has a status: only a dropped connection can say this one
    else:
        exchange.respond_error(error, headers)
