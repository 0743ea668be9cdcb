"""The chat request tests send when all that matters is that it is an ordinary one: one user message, "hi",
which the simulator counts as one prompt token. Tests whose prompt matters (its token count, its text)
spell their own body.

    CHAT = chat_body("sim", max_tokens=2)                  # {"model": "sim", "messages": [...], "max_tokens": 2}
    httpx.post(url, json=chat_body("sim", max_tokens=5, stream=True))
    client.chat.completions.create(**chat_body("sim", max_tokens=1))   # the SDK takes the same fields
    sock.sendall(raw_post(key, CHAT_BYTES))                # the same as JSON bytes, for raw sockets
"""

from __future__ import annotations

import json


def chat_body(model: str, **fields: object) -> dict[str, object]:
    """A new chat request body for `model`; `fields` add to it (max_tokens, stream, ...) or replace its own."""
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


# Model `sim` (the conftest simulator's), three completion tokens.
CHAT_BYTES = json.dumps(chat_body("sim", max_tokens=3)).encode()
