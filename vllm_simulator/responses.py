"""/v1/responses, OpenAI's Responses API as vLLM serves it: one assistant message of made-up tokens,
whole or as a stream of named events, with vLLM's usage (`input_tokens`, `output_tokens`).

Input is a string or a list of message items; the simulator takes no tools. Like its chat
completions, it always writes max_output_tokens tokens, so the answer is `incomplete` with the reason
`max_output_tokens`, as vLLM's is when it stops at the limit. One the engine aborts (a sleep) ends early
and `completed`, as vLLM's plain-text responses do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from .errors import invalid
from .faults import Faults, strike
from .generation import in_slot, paced_tokens
from .pieces import PieceWriter, json_answer
from .scheduler import Ticket
from .state import STATE, SimulatorState
from .validation import (
    check_context_length,
    content_text,
    count_input_tokens,
    json_body,
    optional_bool,
    requested_max_tokens,
    requested_model,
)
from .vocabulary import completion_text, token_json


def input_texts(body: dict[str, Any]) -> list[str]:
    """The words the model reads: the instructions, then each input message's text."""
    texts: list[str] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("instructions", "a string")
        texts.append(instructions)
    items = body.get("input")
    if isinstance(items, str):
        return [*texts, items]
    if not isinstance(items, list) or not items:
        raise invalid("input", "a string or a non-empty list of message items")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise invalid(f"input[{index}]", "a message item with a role")
        texts.append(content_text(item.get("content"), f"input[{index}].content"))
    return texts


def usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


def response_object(
    response_id: str, created: int, model: str, max_tokens: int, instructions: Any, done: bool
) -> dict[str, Any]:
    """The response as vLLM writes it, its output and usage still empty."""
    return {
        "id": response_id,
        "created_at": created,
        "incomplete_details": {"reason": "max_output_tokens"} if done else None,
        "instructions": instructions,
        "metadata": None,
        "model": model,
        "object": "response",
        "output": [],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "none",
        "tools": [],
        "top_p": 1.0,
        "background": False,
        "max_output_tokens": max_tokens,
        "max_tool_calls": None,
        "previous_response_id": None,
        "prompt": None,
        "reasoning": None,
        "service_tier": "auto",
        "status": "incomplete" if done else "in_progress",
        "text": None,
        "top_logprobs": None,
        "truncation": "disabled",
        "usage": None,
        "user": None,
    }


def message(item_id: str, text: str, done: bool) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if done:
        content.append({"annotations": [], "text": text, "type": "output_text", "logprobs": None})
    status = "completed" if done else "in_progress"
    return {"id": item_id, "content": content, "role": "assistant", "status": status, "type": "message"}


async def responses(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await json_body(request)
    model = requested_model(body, state.config)
    prompt_tokens = count_input_tokens(input_texts(body))
    max_tokens = requested_max_tokens(body, "max_output_tokens")
    stream = optional_bool(body, "stream")
    state.faults.raise_injected_error()
    check_context_length(state.config.max_model_len, prompt_tokens, max_tokens)
    created = int(time.time())
    answer = response_object(
        "resp_" + uuid.uuid4().hex, created, model, max_tokens, body.get("instructions"), done=False
    )
    item_id = "msg_" + uuid.uuid4().hex

    async def run(faults: Faults, ticket: Ticket) -> web.StreamResponse:
        if stream:
            return await stream_response(request, state, answer, item_id, prompt_tokens, faults, ticket)
        stop_at = faults.stop_after(max_tokens)
        produced = 0
        async for _ in paced_tokens(state, ticket, max_tokens if stop_at is None else stop_at, faults):
            produced += 1
        if stop_at is not None and not ticket.aborted:
            strike(request, faults)
        return await json_answer(request, finished(answer, item_id, prompt_tokens, produced, ticket.aborted), faults)

    return await in_slot(request, state, prompt_tokens, run)


def finished(
    answer: dict[str, Any], item_id: str, prompt_tokens: int, produced: int, aborted: bool = False
) -> dict[str, Any]:
    # vLLM marks only a stop at the limit; a response it aborted keeps its default status, completed.
    return {
        **answer,
        "incomplete_details": None if aborted else {"reason": "max_output_tokens"},
        "status": "completed" if aborted else "incomplete",
        "output": [message(item_id, completion_text(produced), done=True)],
        "usage": usage(prompt_tokens, produced),
    }


async def stream_response(
    request: web.Request,
    state: SimulatorState,
    answer: dict[str, Any],
    item_id: str,
    prompt_tokens: int,
    faults: Faults,
    ticket: Ticket,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    writer = PieceWriter(response, faults)
    sequence = 0

    async def event(kind: str, fields: dict[str, Any]) -> None:
        nonlocal sequence
        data = orjson.dumps({**fields, "sequence_number": sequence, "type": kind})
        sequence += 1
        await writer.write(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")

    place = {"item_id": item_id, "output_index": 0}
    await event("response.created", {"response": answer})
    await event("response.in_progress", {"response": answer})
    await event("response.output_item.added", {"item": message(item_id, "", done=False), "output_index": 0})
    part = {"annotations": [], "text": "", "type": "output_text", "logprobs": []}
    await event("response.content_part.added", {"content_index": 0, **place, "part": part})
    # Every delta is the same bytes around its token, so they are built once per stream.
    delta_head = b'event: response.output_text.delta\ndata: {"content_index":0,"delta":'
    delta_tail = b',"item_id":' + orjson.dumps(item_id) + b',"logprobs":[],"output_index":0,"sequence_number":'
    max_tokens = answer["max_output_tokens"]
    stop_at = faults.stop_after(max_tokens)
    produced = 0
    async for position in paced_tokens(state, ticket, max_tokens if stop_at is None else stop_at, faults):
        await writer.write(
            delta_head
            + token_json(position)
            + delta_tail
            + str(sequence).encode()
            + b',"type":"response.output_text.delta"}\n\n'
        )
        sequence += 1
        produced += 1
    if stop_at is not None and not ticket.aborted:
        strike(request, faults)
    text = completion_text(produced)
    await event("response.output_text.done", {"content_index": 0, **place, "logprobs": [], "text": text})
    await event("response.content_part.done", {"content_index": 0, **place, "part": {**part, "text": text}})
    await event("response.output_item.done", {"item": message(item_id, text, done=True), "output_index": 0})
    final = finished(answer, item_id, prompt_tokens, produced, ticket.aborted)
    await event("response.completed", {"response": final})
    await response.write_eof()
    return response
