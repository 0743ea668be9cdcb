"""Request-body checks, each answering a malformed field with the 400 vLLM gives, never a 500.

Also the few counts taken from a checked body: prompt tokens, max tokens, the context-length limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from .config import SimulatorConfig
from .errors import ApiError, bad_request, invalid

DEFAULT_MAX_TOKENS = 16
# vLLM's request models are pydantic models read in lax mode: a boolean may also come as 0 or 1 (int
# or float) or as one of these words, in any case. Anything else is a 400.
TRUE_WORDS = frozenset({"1", "t", "true", "y", "yes", "on"})
FALSE_WORDS = frozenset({"0", "f", "false", "n", "no", "off"})


async def json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, also kept in the request's record (even when it is not JSON)."""
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


def requested_model(body: dict[str, Any], config: SimulatorConfig) -> str:
    model = body.get("model")
    if model is None:  # like vLLM: no model means the primary one
        return config.served_model_names[0]
    if not isinstance(model, str):
        raise invalid("model", "a string")
    if model not in config.served_model_names:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")
    return model


def is_int(value: Any) -> bool:
    # JSON true/false decode to bool, which Python counts as an int; `true` is never token id 1.
    return isinstance(value, int) and not isinstance(value, bool)


def is_token_id(value: Any) -> bool:
    return is_int(value) and value >= 0


def optional_bool(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    """The field as vLLM reads a `bool | None` (pydantic's lax mode); absent or null is False."""
    value = body.get(name)
    if value is None:
        return False
    if value is True or value is False:
        return value
    if type(value) in (int, float) and value in (0, 1):
        return bool(value == 1)
    if isinstance(value, str) and value.lower() in TRUE_WORDS | FALSE_WORDS:
        # "false" is false: a truthy string must not quietly turn streaming on.
        return value.lower() in TRUE_WORDS
    raise invalid(param or name, "a boolean")


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
        if all(isinstance(item, list) and item and all(is_token_id(i) for i in item) for item in value):
            return list(value)
    raise invalid(
        param,
        "a string, a non-empty list of strings, a non-empty list of token ids "
        "(integers >= 0) or a non-empty list of such lists",
    )


def count_input_tokens(inputs: Sequence[str | list[int]]) -> int:
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


def check_context_length(max_model_len: int, prompt_tokens: int, max_tokens: int) -> None:
    if prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
            "the completion). Please reduce the length of the messages or completion."
        )
