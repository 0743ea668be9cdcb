"""Chat and text completions: paced tokens, the --max-num-seqs slot queue, whole and streamed answers.

A request is checked, waits for a slot like a queued sequence in vLLM's engine (scheduler.py), then
generates; an engine put to sleep freezes or aborts it, and an aborted one ends with finish_reason "abort".
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .errors import bad_request, invalid
from .faults import Faults, strike
from .pieces import PieceWriter, json_answer
from .scheduler import Ticket
from .state import STATE, SimulatorState
from .validation import (
    check_context_length,
    count_input_tokens,
    is_int,
    json_body,
    messages_texts,
    optional_bool,
    requested_max_tokens,
    requested_model,
    text_or_token_inputs,
)
from .vocabulary import completion_text, token_ids, token_json


@dataclass(frozen=True)
class Generation:
    chat: bool
    request_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    # The prompt's words when the request asked for prompt_logprobs (None: it did not).
    prompt_words: list[str] | None = None

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await generate(request, chat=False)


async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await json_body(request)
    model = requested_model(body, state.config)
    # Validation before the injected failure: vLLM rejects a malformed request before it reaches
    # the engine, so a broken engine still answers bad input with 400.
    if chat:
        texts: list[str | list[int]] = list(messages_texts(body.get("messages")))
        max_tokens = requested_max_tokens(body, "max_completion_tokens", "max_tokens")
    else:
        if body.get("prompt") is None:
            raise bad_request("`prompt` is required.", "prompt")
        texts = text_or_token_inputs(body["prompt"], "prompt")
        max_tokens = requested_max_tokens(body, "max_tokens")
    prompt_tokens = count_input_tokens(texts)
    stream = optional_bool(body, "stream")
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is not None and not (is_int(prompt_logprobs) and prompt_logprobs >= -1):
        raise invalid("prompt_logprobs", "an integer >= -1")
    if prompt_logprobs is not None and stream:
        raise bad_request("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    elif not isinstance(stream_options, dict):
        raise invalid("stream_options", "an object")
    include_usage = optional_bool(stream_options, "include_usage", "stream_options.include_usage")
    optional_bool(stream_options, "continuous_usage_stats", "stream_options.continuous_usage_stats")
    state.faults.raise_injected_error()
    check_context_length(state.config.max_model_len, prompt_tokens, max_tokens)
    # Like vLLM, a client's X-Request-Id becomes part of the completion id.
    base_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    job = Generation(
        chat=chat,
        request_id=("chatcmpl-" if chat else "cmpl-") + base_id,
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        prompt_words=None if prompt_logprobs is None else prompt_words(texts),
    )

    async def answer(faults: Faults, ticket: Ticket) -> web.StreamResponse:
        if job.stream:
            return await stream_generation(request, state, job, faults, ticket)
        return await whole_generation(request, state, job, faults, ticket)

    return await in_slot(request, state, prompt_tokens, answer)


def prompt_words(texts: list[str | list[int]]) -> list[str]:
    """The prompt's tokens as words (a token id stands for itself)."""
    return [word for text in texts for word in (text.split() if isinstance(text, str) else map(str, text))]


async def in_slot(
    request: web.Request,
    state: SimulatorState,
    prompt_tokens: int,
    answer: Callable[[Faults, Ticket], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Run `answer` once the scheduler gives the request one of the engine's slots, counted as
    running; aborted or crashed if it does not finish. An engine abort while it is queued still
    runs `answer`, with the ticket aborted, since vLLM answers such a request (with no tokens)."""
    faults = state.faults.copy()  # a request keeps the faults it started with
    ticket = Ticket(state.scheduler)
    try:
        await state.scheduler.admit(ticket)
    except asyncio.CancelledError:  # the client gave up while queued
        state.aborted += 1
        raise
    if ticket.running:
        state.peak_running = max(state.peak_running, state.running)
        state.prompt_tokens += prompt_tokens
    finished = False
    try:
        response = await answer(faults, ticket)
        finished = True
        return response
    finally:
        state.scheduler.finish(ticket)
        if finished and not ticket.aborted:
            state.completed += 1
        elif request.get("crashed"):
            state.crashed += 1
        else:
            state.aborted += 1


async def paced_tokens(state: SimulatorState, ticket: Ticket, n_tokens: int, faults: Faults) -> AsyncIterator[int]:
    """Yield token positions 0..n-1 at the configured pace (first-token delay, then rate); stop early
    when the engine aborts the request (ticket.aborted), and make none while the engine is frozen."""
    loop = asyncio.get_running_loop()
    rate = state.config.token_rate
    # Every token is due at a time counted from the first; time spent frozen moves them all later,
    # so a request resumed after a sleep goes on at its pace instead of catching up in a burst.
    start = loop.time() + state.config.first_token_delay + (faults.slow_start or 0.0)
    for position in range(n_tokens):
        if rate <= 0 and position % 32 == 31:
            await asyncio.sleep(0)  # at full speed, still let other streams and aborts in
        due = start + position / rate if rate > 0 else start
        while True:
            if ticket.held:
                held = await ticket.hold()
                if ticket.aborted:
                    return
                start += held
                due += held
            wait = due - loop.time()
            if wait <= 0:
                break
            await ticket.sleep(wait)
        if position == n_tokens - 1:
            ticket.done = True  # an abort from here on finds the request finished
        state.generation_tokens += 1
        yield position


async def whole_generation(
    request: web.Request, state: SimulatorState, job: Generation, faults: Faults, ticket: Ticket
) -> web.StreamResponse:
    stop_at = faults.stop_after(job.max_tokens)
    produced = 0
    async for _ in paced_tokens(state, ticket, stop_at if stop_at is not None else job.max_tokens, faults):
        produced += 1
    if stop_at is not None and not ticket.aborted:
        strike(request, faults)
    text = completion_text(produced)
    # vLLM answers an aborted request whole, with the tokens it had and finish_reason "abort".
    finish_reason = "abort" if ticket.aborted else "length"
    choice: dict[str, Any]
    if job.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
    answer: dict[str, Any] = {
        "id": job.request_id,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": [choice],
        "usage": job.usage(produced),
    }
    if job.prompt_words is not None:
        # Where vLLM puts them: a chat answer's after its usage (a long prompt's make the usage the
        # first bytes of a megabyte or more), a text completion's in its choice.
        (answer if job.chat else choice)["prompt_logprobs"] = prompt_logprobs(job.prompt_words)
    return await json_answer(request, answer, faults)


def prompt_logprobs(words: list[str]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's prompt_logprobs: nothing for the first token, then each token's id, log-probability and text."""
    ids = token_ids(" ".join(words))
    entries: list[dict[str, dict[str, Any]] | None] = [None]
    for position in range(1, len(words)):
        entries.append(
            {str(ids[position]): {"logprob": -1.0 - position % 7 / 8, "rank": 1, "decoded_token": words[position]}}
        )
    return entries


async def stream_generation(
    request: web.Request, state: SimulatorState, job: Generation, faults: Faults, ticket: Ticket
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    writer = PieceWriter(response, faults)
    created = int(time.time())
    # Every chunk is the same bytes around its token, so they are built once per stream.
    head = (
        b'data: {"id":'
        + orjson.dumps(job.request_id)
        + b',"object":'
        + (b'"chat.completion.chunk"' if job.chat else b'"text_completion"')
        + b',"created":'
        + str(created).encode()
        + b',"model":'
        + orjson.dumps(job.model)
        + b',"choices":[{"index":0,'
    )
    token_open = b'"delta":{"content":' if job.chat else b'"text":'
    token_close = b"}," if job.chat else b","
    tail_more = b'"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
    tail_last = b'"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
    tail_abort = b'"logprobs":null,"finish_reason":"abort","stop_reason":null}]}\n\n'
    if job.chat:  # vLLM opens a chat stream with the role
        await writer.write(head + b'"delta":{"role":"assistant","content":""},' + tail_more)

    stop_at = faults.stop_after(job.max_tokens)
    n_tokens = stop_at if stop_at is not None else job.max_tokens
    produced = 0
    async for position in paced_tokens(state, ticket, n_tokens, faults):
        last = stop_at is None and position == n_tokens - 1
        await writer.write(head + token_open + token_json(position) + token_close + (tail_last if last else tail_more))
        produced += 1
    if ticket.aborted:
        # vLLM ends an aborted stream with an empty delta carrying finish_reason "abort", then the
        # usage and [DONE] as usual; a request aborted before its first token gets no such chunk.
        if produced:
            await writer.write(head + (b'"delta":{"content":""},' if job.chat else b'"text":"",') + tail_abort)
    elif stop_at is not None:
        strike(request, faults)
    if job.include_usage:
        usage_chunk: dict[str, Any] = {
            "id": job.request_id,
            "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": created,
            "model": job.model,
            "choices": [],
            "usage": job.usage(produced),
        }
        await writer.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
    await writer.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
