"""vLLM SIMULATOR: a stand-in for vLLM's OpenAI server with no model behind it.

It answers the same HTTP API as `vllm serve` (models, chat and text completions, embeddings,
tokenize, transcriptions, health, Prometheus metrics) with lorem-ipsum tokens at a set pace, queues
requests beyond --max-num-seqs like the engine does, and can be told to fail (`/_simulator/faults`).
It exists for tests, benchmarks and GPU-less demos; every response says so (`x-vllm-simulator: 1`).

Run: python -m vllm_gateway.simulator --served-model-name NAME [--port 8000] [...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import logging
import math
import os
import struct
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("vllm_simulator")

SIMULATED_VLLM_VERSION = "0.32.0"
OWNED_BY = "vllm-simulator"
SIMULATOR_HEADER = "x-vllm-simulator"
DEFAULT_MAX_TOKENS = 16
EMBEDDING_SIZE = 16

# The "tokens": one word each. Prebuilt as JSON strings so a streamed chunk is three byte joins.
LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris "
    "nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse "
    "cillum eu fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui "
    "officia deserunt mollit anim id est laborum"
).split()
VOCAB = sorted(set(LOREM))
VOCAB_IDS = {word: index for index, word in enumerate(VOCAB)}
_TOKEN_TEXT = [[word, " " + word] for word in LOREM]  # [first token form, later token form]
_TOKEN_JSON = [[orjson.dumps(text) for text in forms] for forms in _TOKEN_TEXT]


def token_text(position: int) -> str:
    return _TOKEN_TEXT[position % len(LOREM)][position > 0]


def completion_text(n_tokens: int) -> str:
    return "".join(token_text(i) for i in range(n_tokens))


# ---- Errors -------------------------------------------------------------------------------------


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
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}
        return json_response(body, status=self.status)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


# ---- Configuration and run-time state -----------------------------------------------------------


# A 1xx status cannot end an HTTP exchange (clients hang or fail to frame the answer), and an
# error fault below 400 would be a success with an error body; neither simulates a real failure.
_FAULT_STATUS_RANGES = {"error_status": (400, 599), "health_status": (200, 599)}
# The active faults are answered as JSON, and orjson encodes integers up to 64 bits only.
_MAX_FAULT_TOKENS = 2**63 - 1


@dataclass
class Faults:
    """Injected failures; each applies to every request it concerns until cleared."""

    error_status: int | None = None  # answer inference requests with this status
    slow_start: float | None = None  # extra seconds before the first token
    crash_after_tokens: int | None = None  # send N tokens, then reset the TCP connection
    exit_after_tokens: int | None = None  # send N tokens, then the whole process exits
    health_status: int | None = None  # /health answers this status

    @classmethod
    def parse(cls, data: Any) -> Faults:
        if not isinstance(data, dict):
            raise bad_request("faults must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise bad_request(f"unknown fault(s) {unknown}; known: {sorted(known)}")
        faults = cls()
        for name, value in data.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad_request(f"fault {name} must be a number >= 0", name)
            if name in _FAULT_STATUS_RANGES:
                low, high = _FAULT_STATUS_RANGES[name]
                if not (low <= value <= high and value == int(value)):
                    raise bad_request(f"fault {name} must be an HTTP status from {low} to {high}",
                                      name)
            elif name.endswith("_tokens") and (value != int(value) or value > _MAX_FAULT_TOKENS):
                raise bad_request(f"fault {name} must be a whole number of tokens up to "
                                  f"{_MAX_FAULT_TOKENS}", name)
            setattr(faults, name, float(value) if name == "slow_start" else int(value))
        return faults

    def active(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class SimulatorConfig:
    served_model_names: tuple[str, ...]
    model_path: str
    max_model_len: int = 4096
    max_num_seqs: int = 8
    first_token_delay: float = 0.05
    token_rate: float = 200.0
    api_key: str | None = None


class SimulatorState:
    """Everything that changes while serving: queue, counters, faults, the request record."""

    def __init__(self, config: SimulatorConfig, faults: Faults) -> None:
        self.config = config
        self.faults = faults
        self.created = int(time.time())
        self.slots = asyncio.Semaphore(config.max_num_seqs)
        self.running = 0
        self.waiting = 0
        self.aborted = 0
        self.completed = 0
        self.crashed = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests: Counter[str] = Counter()
        self.last_request: dict[str, Any] | None = None
        self.last_by_path: dict[str, dict[str, Any]] = {}

    @property
    def primary_name(self) -> str:
        return self.config.served_model_names[0]

    def check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if model is None:  # like vLLM: no model means the primary one
            return self.primary_name
        if not isinstance(model, str):
            raise invalid("model", "a string")
        if model not in self.config.served_model_names:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")
        return model

    def raise_injected_error(self) -> None:
        if self.faults.error_status is not None:
            raise ApiError(self.faults.error_status, "Simulated engine failure (injected fault).")

    @contextmanager
    def _counted(self, attribute: str) -> Iterator[None]:
        setattr(self, attribute, getattr(self, attribute) + 1)
        try:
            yield
        finally:
            setattr(self, attribute, getattr(self, attribute) - 1)

    async def acquire_slot(self) -> None:
        with self._counted("waiting"):
            await self.slots.acquire()

    async def tokens(self, n_tokens: int, faults: Faults) -> AsyncIterator[int]:
        """Yield token positions 0..n-1 at the configured pace (first-token delay, then rate)."""
        loop = asyncio.get_running_loop()
        delay = self.config.first_token_delay + (faults.slow_start or 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        start = loop.time()
        rate = self.config.token_rate
        for position in range(n_tokens):
            if rate > 0 and position > 0:
                wait = start + position / rate - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            elif position % 32 == 31:
                await asyncio.sleep(0)  # at full speed, still let other streams and aborts in
            self.generation_tokens += 1
            yield position

    def record(self, request: web.Request) -> dict[str, Any]:
        self.requests[request.path] += 1
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            key = key.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        entry = {"method": request.method, "path": request.path, "query": dict(request.query),
                 "headers": headers, "body": None}
        self.last_by_path[request.path] = entry
        if request.path not in _UNRECORDED_PATHS:
            self.last_request = entry
        return entry

    def stats(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "running": self.running,
            "waiting": self.waiting,
            "aborted": self.aborted,
            "completed": self.completed,
            "crashed": self.crashed,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "last_request": _encodable(self.last_request),
            "last_by_path": {path: _encodable(entry) for path, entry in self.last_by_path.items()},
        }

    def reset_stats(self) -> None:
        self.requests.clear()
        self.aborted = self.completed = self.crashed = 0
        self.last_request = None
        self.last_by_path = {}


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


# Polling paths (health checkers poll /health and /v1/models) never overwrite "last_request", so a
# health checker cannot hide what a test sent.
_UNRECORDED_PATHS = frozenset({"/health", "/metrics", "/version", "/ping", "/v1/models"})

STATE = web.AppKey("state", SimulatorState)


# ---- Request parsing ----------------------------------------------------------------------------


async def json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    record = request.get("record")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if record is not None:
            record["body"] = raw.decode(errors="replace")
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if record is not None:
        record["body"] = body
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def invalid(param: str, expected: str) -> ApiError:
    """A 400 naming the offending field, as vLLM's request validation answers."""
    return bad_request(f"`{param}` must be {expected}.", param)


def is_int(value: Any) -> bool:
    # JSON true/false decode to bool, which Python counts as an int; `true` is never token id 1.
    return isinstance(value, int) and not isinstance(value, bool)


def is_token_id(value: Any) -> bool:
    return is_int(value) and value >= 0


def optional_bool(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        # A truthy string such as "false" must not quietly turn streaming on.
        raise invalid(param or name, "a boolean")
    return value


def content_text(content: Any, param: str) -> str:
    """The text of a message's content: a string, content parts, or null (a tool-call turn)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(param, "a string, a list of content parts or null")
    texts: list[str] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise invalid(where, "a content part object")
        kind = part.get("type")
        if not isinstance(kind, str):
            raise invalid(f"{where}.type", "a string")
        text = part.get("text")
        if text is None and kind != "text":
            continue  # an image or audio part: no words to count
        if not isinstance(text, str):
            raise invalid(f"{where}.text", "a string")
        texts.append(text)
    return " ".join(texts)


def messages_texts(messages: Any) -> list[str]:
    """The text of each chat message, after checking every message has the shape vLLM requires."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "a non-empty list of message objects")
    texts: list[str] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(where, "a message object")
        if not isinstance(message.get("role"), str):
            raise invalid(f"{where}.role", "a string")
        texts.append(content_text(message.get("content"), f"{where}.content"))
    return texts


def text_or_token_inputs(value: Any, param: str) -> list[str | list[int]]:
    """The inputs of a completions prompt or embeddings input, in the four shapes OpenAI allows.

    A string, a list of strings, a list of token ids (one input), or a list of token-id lists.
    Checked without recursion, so a deeply nested body cannot exhaust the interpreter's stack.
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(is_token_id(item) for item in value):
            return [value]
        if all(isinstance(item, list) and item and all(is_token_id(i) for i in item)
               for item in value):
            return list(value)
    raise invalid(param, "a string, a non-empty list of strings, a non-empty list of token ids "
                         "(integers >= 0) or a non-empty list of such lists")


def count_input_tokens(inputs: list[str | list[int]]) -> int:
    """Whitespace words of text; token ids count one each."""
    return sum(len(item.split()) if isinstance(item, str) else len(item) for item in inputs)


def requested_max_tokens(body: dict[str, Any], *names: str) -> int:
    """The first of `names` that is set; every one of them is checked, as vLLM checks each field."""
    chosen: int | None = None
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not is_int(value) or value < 1:
            raise invalid(name, "an integer >= 1")
        if chosen is None:
            chosen = value
    return DEFAULT_MAX_TOKENS if chosen is None else chosen


def check_context_length(state: SimulatorState, prompt_tokens: int, max_tokens: int) -> None:
    limit = state.config.max_model_len
    if prompt_tokens + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
            "the completion). Please reduce the length of the messages or completion.")


def token_ids(text: str) -> list[int]:
    return [VOCAB_IDS.get(word, len(VOCAB) + zlib.crc32(word.encode()) % 50_000)
            for word in text.split()]


# ---- Generation (chat and text completions) -----------------------------------------------------


@dataclass(frozen=True)
class Generation:
    chat: bool
    request_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, chat=False)


async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await json_body(request)
    model = state.check_model(body)
    # Validation before the injected failure: vLLM rejects a malformed request before it reaches
    # the engine, so a broken engine still answers bad input with 400.
    if chat:
        prompt_tokens = count_input_tokens(messages_texts(body.get("messages")))
        max_tokens = requested_max_tokens(body, "max_completion_tokens", "max_tokens")
    else:
        if body.get("prompt") is None:
            raise bad_request("`prompt` is required.", "prompt")
        prompt_tokens = count_input_tokens(text_or_token_inputs(body["prompt"], "prompt"))
        max_tokens = requested_max_tokens(body, "max_tokens")
    stream = optional_bool(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    elif not isinstance(stream_options, dict):
        raise invalid("stream_options", "an object")
    include_usage = optional_bool(stream_options, "include_usage", "stream_options.include_usage")
    state.raise_injected_error()
    check_context_length(state, prompt_tokens, max_tokens)
    # Like vLLM, a client's X-Request-Id becomes part of the completion id.
    base_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    job = Generation(
        chat=chat, request_id=("chatcmpl-" if chat else "cmpl-") + base_id, model=model,
        prompt_tokens=prompt_tokens, max_tokens=max_tokens, stream=stream,
        include_usage=include_usage)
    faults = Faults(**asdict(state.faults))  # a request keeps the faults it started with

    try:
        await state.acquire_slot()
    except asyncio.CancelledError:  # the client gave up while queued
        state.aborted += 1
        raise
    state.running += 1
    state.prompt_tokens += prompt_tokens
    finished = False
    try:
        if job.stream:
            response = await stream_generation(request, state, job, faults)
        else:
            response = await whole_generation(request, state, job, faults)
        finished = True
        return response
    finally:
        state.running -= 1
        state.slots.release()
        if finished:
            state.completed += 1
        elif not request.get("crashed"):
            state.aborted += 1


def fault_stop(n_tokens: int, faults: Faults) -> int | None:
    """Number of tokens after which a crash or exit fault strikes, if one is set."""
    limits = [n for n in (faults.crash_after_tokens, faults.exit_after_tokens) if n is not None]
    return min([n_tokens, *limits]) if limits else None


async def strike(request: web.Request, faults: Faults) -> None:
    """Carry out a crash or exit fault: the client sees the connection die, no closing chunk."""
    if faults.exit_after_tokens is not None:
        log.error("SIMULATOR: exiting after %s tokens (injected fault)", faults.exit_after_tokens)
        logging.shutdown()
        os._exit(1)
    request["crashed"] = True
    request.app[STATE].crashed += 1
    transport = request.transport
    if transport is not None:
        # Close, not reset: a reset would let the client's kernel discard tokens it already
        # received, and a process that dies after reading its request closes with FIN too.
        transport.close()
    raise asyncio.CancelledError()


async def whole_generation(request: web.Request, state: SimulatorState, job: Generation,
                           faults: Faults) -> web.Response:
    stop_at = fault_stop(job.max_tokens, faults)
    produced = 0
    async for _ in state.tokens(stop_at if stop_at is not None else job.max_tokens, faults):
        produced += 1
    if stop_at is not None:
        await strike(request, faults)
    text = completion_text(produced)
    if job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                  "logprobs": None, "finish_reason": "length", "stop_reason": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                  "stop_reason": None}
    return json_response({
        "id": job.request_id, "object": "chat.completion" if job.chat else "text_completion",
        "created": int(time.time()), "model": job.model, "choices": [choice],
        "usage": job.usage(produced)})


async def stream_generation(request: web.Request, state: SimulatorState, job: Generation,
                            faults: Faults) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    created = int(time.time())
    head = (b'data: {"id":' + orjson.dumps(job.request_id) + b',"object":'
            + (b'"chat.completion.chunk"' if job.chat else b'"text_completion"')
            + b',"created":' + str(created).encode() + b',"model":' + orjson.dumps(job.model)
            + b',"choices":[{"index":0,')
    token_open = b'"delta":{"content":' if job.chat else b'"text":'
    token_close = b"}," if job.chat else b","
    tail_more = b'"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
    tail_last = b'"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
    if job.chat:  # vLLM opens a chat stream with the role
        await response.write(head + b'"delta":{"role":"assistant","content":""},' + tail_more)

    stop_at = fault_stop(job.max_tokens, faults)
    n_tokens = stop_at if stop_at is not None else job.max_tokens
    async for position in state.tokens(n_tokens, faults):
        last = stop_at is None and position == n_tokens - 1
        text = _TOKEN_JSON[position % len(LOREM)][position > 0]
        await response.write(head + token_open + text + token_close
                             + (tail_last if last else tail_more))
    if stop_at is not None:
        await strike(request, faults)
    if job.include_usage:
        usage_chunk = {"id": job.request_id,
                       "object": "chat.completion.chunk" if job.chat else "text_completion",
                       "created": created, "model": job.model, "choices": [],
                       "usage": job.usage(n_tokens)}
        await response.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


# ---- Other inference endpoints ------------------------------------------------------------------


def embedding_of(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(byte - 127.5) / 127.5 for byte in digest[:EMBEDDING_SIZE]]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    model = state.check_model(body)
    items = text_or_token_inputs(body.get("input"), "input")
    encoding_format = body.get("encoding_format")
    if encoding_format not in (None, "float", "base64"):
        raise invalid("encoding_format", '"float" or "base64"')
    state.raise_injected_error()
    as_base64 = encoding_format == "base64"
    data = []
    for index, item in enumerate(items):
        vector = embedding_of(item if isinstance(item, str) else orjson.dumps(item).decode())
        encoded: Any = vector
        if as_base64:  # the openai SDK asks for this by default: little-endian float32
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": encoded})
    prompt_tokens = count_input_tokens(items)
    state.prompt_tokens += prompt_tokens
    return json_response({
        "id": "embd-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()),
        "model": model, "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                  "completion_tokens": 0}})


async def transcriptions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        form = await request.post()
    except (ValueError, HttpProcessingError) as exc:
        # aiohttp's multipart reader raises BadHttpMessage for malformed part headers.
        raise bad_request(f"Invalid form body: {exc}") from None
    upload = form.get("file")
    summary: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
    if isinstance(upload, web.FileField):
        size = len(upload.file.read())
        summary["file"] = {"filename": upload.filename, "size": size}
    request["record"]["body"] = summary
    for name in ("model", "response_format"):
        if isinstance(form.get(name), web.FileField):
            raise invalid(name, "a text field, not a file")
    model = state.check_model({"model": form.get("model")})
    if not isinstance(upload, web.FileField):
        raise bad_request("`file` must be an uploaded audio file.", "file")
    state.raise_injected_error()
    text = completion_text(max(1, min(64, size // 1000)))
    if form.get("response_format") == "text":
        return web.Response(text=text)
    return json_response({"text": text, "model": model})


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    state.check_model(body)
    # vLLM tells the chat form from the text form by which of the two fields is there.
    if body.get("messages") is not None:
        text = " ".join(messages_texts(body["messages"]))
    elif body.get("prompt") is None:
        raise bad_request("`prompt` (a string) or `messages` is required.", "prompt")
    elif isinstance(body["prompt"], str):
        text = body["prompt"]
    else:
        raise invalid("prompt", "a string")
    ids = token_ids(text)
    return json_response({"count": len(ids), "max_model_len": state.config.max_model_len,
                          "tokens": ids, "token_strs": None})


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    state.check_model(body)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(is_token_id(i) for i in ids):
        raise invalid("tokens", "a list of token ids (integers >= 0)")
    words = [VOCAB[i] if i < len(VOCAB) else "<unk>" for i in ids]
    return json_response({"prompt": " ".join(words)})


# ---- Server endpoints ---------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    status = request.app[STATE].faults.health_status
    return web.Response(status=status or 200)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cards = [{
        "id": name, "object": "model", "created": state.created, "owned_by": OWNED_BY,
        "root": state.config.model_path, "parent": None,
        "max_model_len": state.config.max_model_len,
        "permission": [{"id": "modelperm-" + uuid.uuid4().hex, "object": "model_permission",
                        "created": state.created, "allow_create_engine": False,
                        "allow_sampling": True, "allow_logprobs": True,
                        "allow_search_indices": False, "allow_view": True,
                        "allow_fine_tuning": False, "organization": "*", "group": None,
                        "is_blocking": False}],
    } for name in state.config.served_model_names]
    return json_response({"object": "list", "data": cards})


async def version(request: web.Request) -> web.Response:
    return json_response({"version": SIMULATED_VLLM_VERSION + "+simulator"})


_METRICS = (
    ("vllm:num_requests_running", "gauge", "Requests generating now (simulated engine).",
     lambda s: s.running),
    ("vllm:num_requests_waiting", "gauge", "Requests queued beyond max-num-seqs (simulated).",
     lambda s: s.waiting),
    ("vllm:kv_cache_usage_perc", "gauge", "Fraction of sequence slots in use (simulated).",
     lambda s: s.running / s.config.max_num_seqs),
    ("vllm:prompt_tokens_total", "counter", "Prompt tokens processed (simulated).",
     lambda s: s.prompt_tokens),
    ("vllm:generation_tokens_total", "counter", "Tokens generated (simulated).",
     lambda s: s.generation_tokens),
    ("vllm:request_success_total", "counter", "Requests finished normally (simulated).",
     lambda s: s.completed),
)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    label = '{model_name="%s"}' % state.primary_name.replace("\\", "\\\\").replace('"', '\\"')
    lines = []
    for name, kind, help_text, value in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                  f"{name}{label} {float(value(state))}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain",
                        charset="utf-8")


# ---- Simulator control --------------------------------------------------------------------------


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


async def get_stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].stats())


async def reset_stats(request: web.Request) -> web.Response:
    request.app[STATE].reset_stats()
    return json_response({})


# ---- Application --------------------------------------------------------------------------------


@web.middleware
async def front_door(request: web.Request, handler: Any) -> web.StreamResponse:
    """Record the request, enforce --api-key like vLLM (only under /v1), turn errors into JSON."""
    state = request.app[STATE]
    path = request.path
    if not path.startswith("/_simulator/"):
        request["record"] = state.record(request)
    key = state.config.api_key
    if key is not None and path.startswith("/v1") and request.method != "OPTIONS":
        if request.headers.get("Authorization") != "Bearer " + key:
            return json_response({"error": "Unauthorized"}, status=401)
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPException as exc:
        if exc.status in (404, 405):  # FastAPI's shape, as vLLM answers unknown routes
            return json_response({"detail": exc.reason}, status=exc.status)
        if 400 <= exc.status < 500:  # aiohttp's own refusals, e.g. 413 for a body over the limit
            return ApiError(exc.status, exc.text or exc.reason).response()
        raise


async def _label_response(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[SIMULATOR_HEADER] = "1"


def create_app(config: SimulatorConfig, faults: Faults | None = None) -> web.Application:
    app = web.Application(middlewares=[front_door], client_max_size=64 * 1024 * 1024)
    app[STATE] = SimulatorState(config, faults or Faults())
    app.on_response_prepare.append(_label_response)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/_simulator/faults", get_faults)
    app.router.add_post("/_simulator/faults", set_faults)
    app.router.add_delete("/_simulator/faults", clear_faults)
    app.router.add_get("/_simulator/stats", get_stats)
    app.router.add_delete("/_simulator/stats", reset_stats)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_gateway.simulator",
        description="vLLM SIMULATOR: serves vLLM's OpenAI API with made-up tokens and no model, "
                    "for tests, benchmarks and GPU-less demos. Not a real inference server.")
    parser.add_argument("model_tag", nargs="?", help="model path, as `vllm serve MODEL` takes it")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", help="model path shown as `root` (default: the first name)")
    parser.add_argument("--served-model-name", nargs="+", metavar="NAME",
                        help="names clients use; the first is the primary (default: the model)")
    parser.add_argument("--first-token-delay", type=float, default=0.05, metavar="SECONDS")
    parser.add_argument("--token-rate", type=float, default=200.0, metavar="TOKENS_PER_S",
                        help="tokens per second per request; 0 = as fast as possible")
    parser.add_argument("--max-num-seqs", type=int, default=8, metavar="N",
                        help="requests generating at once; the rest wait in a queue")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS",
                        help="sleep this long before opening the port, like loading weights")
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` under /v1")
    faults = parser.add_argument_group("fault defaults (change at run time: /_simulator/faults)")
    faults.add_argument("--error-status", type=int, metavar="STATUS")
    faults.add_argument("--slow-start", type=float, metavar="SECONDS")
    faults.add_argument("--crash-after-tokens", type=int, metavar="N")
    faults.add_argument("--exit-after-tokens", type=int, metavar="N")
    faults.add_argument("--health-status", type=int, metavar="STATUS")
    ignored = parser.add_argument_group("accepted for command-line compatibility with vLLM; no effect")
    ignored.add_argument("--tensor-parallel-size", "-tp", type=int)
    ignored.add_argument("--gpu-memory-utilization", type=float)
    ignored.add_argument("--enforce-eager", action="store_true")
    ignored.add_argument("--max-parallel-loading-workers", type=int)
    ignored.add_argument("--dtype")
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[SimulatorConfig, Faults, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error("give the model either as an argument or with --model, not both")
    model = args.model or args.model_tag
    names = tuple(args.served_model_name or ([model] if model else []))
    if not names:
        parser.error("give --served-model-name NAME or --model PATH")
    if args.max_num_seqs < 1:
        parser.error("--max-num-seqs must be at least 1")
    try:
        faults = Faults.parse({f.name: getattr(args, f.name) for f in fields(Faults)})
    except ApiError as exc:
        parser.error(exc.message)
    config = SimulatorConfig(
        served_model_names=names, model_path=model or names[0], max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, first_token_delay=max(0.0, args.first_token_delay),
        token_rate=max(0.0, args.token_rate), api_key=args.api_key)
    return config, faults, args


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> None:
    config, faults, args = parse_config(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.startup_delay > 0:
        log.info("SIMULATOR: pretending to load weights for %.1f s", args.startup_delay)
        time.sleep(args.startup_delay)
    log.info("vLLM SIMULATOR (no model; lorem tokens) serving %s on http://%s:%d "
             "(max-num-seqs %d, first token %.3f s, %g tokens/s, faults %s)",
             list(config.served_model_names), args.host, args.port, config.max_num_seqs,
             config.first_token_delay, config.token_rate, faults.active())
    web.run_app(create_app(config, faults), host=args.host, port=args.port, print=None,
                access_log=None, handler_cancellation=True, shutdown_timeout=2.0,
                loop=_event_loop())


if __name__ == "__main__":
    main()
