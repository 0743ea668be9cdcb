"""/v1/audio/transcriptions: a multipart upload answered with lorem words, more for a bigger file.

The form is recorded without the audio itself (its name and size only), for tests to check.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .errors import bad_request, invalid, json_response
from .state import STATE
from .validation import requested_model
from .vocabulary import completion_text


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
    model = requested_model({"model": form.get("model")}, state.config)
    if not isinstance(upload, web.FileField):
        raise bad_request("`file` must be an uploaded audio file.", "file")
    state.faults.raise_injected_error()
    text = completion_text(max(1, min(64, size // 1000)))
    if form.get("response_format") == "text":
        return web.Response(text=text)
    return json_response({"text": text, "model": model})
