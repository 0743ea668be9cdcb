"""/tokenize and /detokenize, vLLM's tokenizer endpoints, over the simulator's word vocabulary.

The text form takes `prompt`, the chat form `messages`; ids come from vocabulary.py.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .errors import bad_request, invalid, json_response
from .state import STATE
from .validation import is_token_id, json_body, messages_texts, requested_model
from .vocabulary import detokenized, token_ids


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    requested_model(body, state.config)
    if state.faults.slow_tokenize:
        await asyncio.sleep(state.faults.slow_tokenize)
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
    return json_response(
        {"count": len(ids), "max_model_len": state.config.max_model_len, "tokens": ids, "token_strs": None}
    )


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    requested_model(body, state.config)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(is_token_id(i) for i in ids):
        raise invalid("tokens", "a list of token ids (integers >= 0)")
    return json_response({"prompt": detokenized(ids)})
