"""Error answers from a backend in another shape than OpenAI's, put in that shape before they reach
the client.

vLLM answers its own errors as `{"error": {"message", "type", "param", "code"}}`, but not everything
a client can get from behind the gateway does: uvicorn's `{"detail": "Not Found"}` for a route the
server lacks, vLLM's `{"error": "Unauthorized"}` for a wrong backend key, a plain-text 500, an HTML
page from a proxy in between, the top-level `{"object": "error", "message": ...}` of some vLLM
versions. The SDKs read `error.message` (the openai SDK shows the raw body otherwise), so each of
those is answered as an OpenAI error with the same status and the backend's message. Only answers
with an error status come here; an error already in OpenAI's shape keeps its bytes.
"""

from __future__ import annotations

import re

import orjson

from . import errors
from .errors import GatewayError
from .upstream import Headers, Response

# The most of an error body that is read to find its message. A longer one in OpenAI's shape (vLLM
# quoting a long input back, say) is relayed as it comes; a longer one in another shape is quoted
# from its start, and its connection is closed rather than read to the end.
MAX_ERROR_BYTES = 64 * 1024
# The most of a text that the message quotes: enough for any error line, not a whole page.
MAX_MESSAGE_CHARS = 1000

OPENAI_SHAPED_START = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"error"[ \t\r\n]*:[ \t\r\n]*\{')
HTML_TAG = re.compile(r"<[^>]*>")
WHITESPACE = re.compile(r"\s+")
# The body's own framing and format: a rewrapped body gets its own.
REPLACED_HEADERS = frozenset({b"content-type", b"content-length"})


async def in_openai_shape(upstream: Response, head: Headers, first: bytes) -> tuple[Headers, bytes, bool]:
    """An error answer's head and body, rewrapped unless already in OpenAI's shape (see foreign_error),
    and whether that body is whole; `first` is what has been read of the body. A body in a content
    encoding (which the gateway does not ask for) cannot be read, and is relayed as it comes."""
    if upstream.encoded:
        return head, first, upstream.at_end
    parts = [first]
    size = len(first)
    while not upstream.at_end and size < MAX_ERROR_BYTES:
        chunk = await upstream.read_chunk()
        parts.append(chunk)
        size += len(chunk)
    body = b"".join(parts)
    error = foreign_error(upstream.status, upstream.content_type, body, upstream.at_end)
    if error is None:
        return head, body, upstream.at_end
    head = [(name, value) for name, value in head if name not in REPLACED_HEADERS]
    return [*head, (b"content-type", b"application/json")], error.body(), True


def foreign_error(status: int, content_type: bytes, body: bytes, whole: bool) -> GatewayError | None:
    """The error in OpenAI's shape that an error answer's body stands for; None when the body has that
    shape already (`{"error": {"message": "..."}}`, or, for a body not read to its end, its start)."""
    if not whole:
        if OPENAI_SHAPED_START.match(body):
            return None
        return errors.backend_error(status, quoted(body, content_type, cut=True))
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        return errors.backend_error(status, quoted(body, content_type))
    inner = payload.get("error")
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        return None
    # vLLM's older shape has the fields at the top; `{"error": {...}}` without a string message keeps
    # its other fields.
    fields = inner if isinstance(inner, dict) else payload
    message = next((fields[name] for name in ("message", "detail", "error") if fields.get(name) is not None), None)
    # A message that is not a string (FastAPI's 422 details are a list of problems) is quoted as written.
    text = clipped(message) if isinstance(message, str) else quoted(body, content_type)
    kind, param, code = fields.get("type"), fields.get("param"), fields.get("code")
    return errors.backend_error(
        status,
        text,
        kind if isinstance(kind, str) else None,
        param if isinstance(param, str) else None,
        code if isinstance(code, str | int) and not isinstance(code, bool) else None,
    )


def quoted(body: bytes, content_type: bytes, cut: bool = False) -> str:
    """A body as one line of text for a message: an HTML page's text without its tags, spaces run
    together, at most MAX_MESSAGE_CHARS characters; `cut` says the body was not read to its end."""
    text = body.decode("utf-8", "replace")
    if b"html" in content_type or text.lstrip().startswith("<"):
        text = HTML_TAG.sub(" ", text)
    return clipped(WHITESPACE.sub(" ", text).strip(), cut)


def clipped(text: str, cut: bool = False) -> str:
    if cut or len(text) > MAX_MESSAGE_CHARS:
        return text[:MAX_MESSAGE_CHARS] + "..."
    return text
