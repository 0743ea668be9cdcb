"""/v1/embeddings: a stable made-up vector for each input, as floats or base64 like vLLM answers.

The vector is a hash of the input, so the same text always gets the same embedding.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from .errors import invalid, json_response
from .state import STATE
from .validation import count_input_tokens, json_body, requested_model, text_or_token_inputs

EMBEDDING_SIZE = 16


def embedding_of(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(byte - 127.5) / 127.5 for byte in digest[:EMBEDDING_SIZE]]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    model = requested_model(body, state.config)
    items = text_or_token_inputs(body.get("input"), "input")
    encoding_format = body.get("encoding_format")
    if encoding_format not in (None, "float", "base64"):
        raise invalid("encoding_format", '"float" or "base64"')
    state.faults.raise_injected_error()
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
    return json_response(
        {
            "id": "embd-" + uuid.uuid4().hex,
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
        }
    )
