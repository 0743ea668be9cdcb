"""Canned vLLM-shaped responses and the chat request bodies the load generator sends.

The backend answers every request with the same bytes, so whatever costs CPU in the benchmark is the proxy
in front of it, not the backend. The shapes follow what vLLM's OpenAI server returns for /v1/chat/completions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Four-letter words keep every token event the same size, so the paced backend (which writes a fixed number
# of bytes per write) puts exactly one event in each write, as vLLM does.
WORDS = [
    "that",
    "with",
    "have",
    "this",
    "will",
    "your",
    "from",
    "they",
    "know",
    "want",
    "been",
    "good",
    "much",
    "some",
    "time",
    "very",
    "when",
    "come",
    "here",
    "just",
    "like",
    "long",
    "make",
    "many",
    "over",
    "such",
    "take",
    "than",
    "them",
    "well",
    "were",
    "what",
    "more",
    "most",
    "only",
    "into",
    "also",
    "back",
    "call",
    "each",
    "find",
    "give",
    "hand",
    "high",
    "keep",
    "last",
    "left",
    "life",
    "live",
    "look",
    "made",
    "mean",
    "move",
    "need",
    "next",
    "open",
    "part",
    "play",
    "same",
    "seem",
    "show",
    "side",
    "tell",
    "turn",
    "used",
    "work",
    "year",
]

TOKENS_PER_COMPLETION = 100
PROMPT_TOKENS = 187
CREATED = 1_732_000_000

SYSTEM_PROMPT = (
    "You are a careful assistant for a support team. Answer in plain English, keep answers short, and say so "
    "when you are not sure. Do not invent order numbers, prices or dates."
)
USER_PROMPT = (
    "A customer writes: I ordered a pair of running shoes two weeks ago and the tracking page has said "
    "'label created' ever since. I emailed twice and got an automatic reply both times. I need them for a race "
    "on Sunday. Can you tell me what is going on, whether I can still get them in time, and if not, how I get "
    "my money back? Please draft a reply to this customer that apologises once, explains the likely cause, "
    "offers the options we have (express re-ship or a full refund), and asks which one they prefer."
)


@dataclass(frozen=True)
class Variant:
    """One backend behaviour: which model name routes to it and how its response is written."""

    name: str  # json, stream or paced
    model: str  # the model id clients send; the gateway routes on it
    stream: bool
    paced: bool


VARIANTS = (
    Variant("json", "bench", stream=False, paced=False),
    Variant("stream", "bench-stream", stream=True, paced=False),
    Variant("paced", "bench-paced", stream=True, paced=True),
)


def tokens() -> list[str]:
    return [" " + WORDS[(i * 7) % len(WORDS)] for i in range(TOKENS_PER_COMPLETION)]


def usage() -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "total_tokens": PROMPT_TOKENS + TOKENS_PER_COMPLETION,
        "completion_tokens": TOKENS_PER_COMPLETION,
    }


def completion_json(model: str) -> bytes:
    body = {
        "id": "chatcmpl-bench0000000000000000000000000000",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(tokens()).lstrip(),
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {**usage(), "prompt_tokens_details": None},
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _chunk(model: str, choices: list[dict], **extra: object) -> dict:
    return {
        "id": "chatcmpl-bench0000000000000000000000000000",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": choices,
        **extra,
    }


def _event(payload: dict, size: int | None = None) -> bytes:
    text = json.dumps(payload, separators=(",", ":"))
    raw = f"data: {text}\n\n".encode()
    if size is None or len(raw) % size == 0:
        return raw
    # JSON allows whitespace before the closing brace; padding there keeps events aligned to the write size.
    pad = size - len(raw) % size
    return f"data: {text[:-1]}{' ' * pad}}}\n\n".encode()


def sse_events(model: str) -> list[bytes]:
    """The events of one streamed completion: role, 100 tokens (the last with its finish reason), usage, [DONE]."""
    words = tokens()

    def token(word: str, finish: str | None) -> dict:
        choice = {"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        return _chunk(model, [choice])

    size = len(_event(token(words[0], None)))
    events = [
        _event(
            _chunk(
                model,
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
            ),
            size,
        )
    ]
    events += [_event(token(word, None)) for word in words[:-1]]
    events.append(_event(token(words[-1], "length"), size))
    events.append(_event(_chunk(model, [], usage=usage()), size))
    events.append(b"data: [DONE]\n\n")
    return events


def token_event_size(model: str) -> int:
    return len(sse_events(model)[1])


def request_body(model: str, stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT},
        ],
        "max_tokens": TOKENS_PER_COMPLETION,
        "temperature": 0.7,
        "top_p": 0.95,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


@dataclass(frozen=True)
class CannedFiles:
    """Where write_canned() put each variant's response and request body, and the stream's dimensions."""

    root: Path
    events_per_stream: int

    def response(self, variant: Variant) -> Path:
        return self.root / f"response-{variant.name}.{'sse' if variant.stream else 'json'}"

    def models(self, variant: Variant) -> Path:
        return self.root / f"models-{variant.name}.json"

    def body(self, variant: Variant) -> Path:
        return self.root / f"request-{variant.name}.json"


def models_list(model: str) -> bytes:
    return json.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": CREATED,
                    "owned_by": "vllm",
                    "root": "/bench",
                    "parent": None,
                    "max_model_len": 4096,
                    "permission": [],
                }
            ],
        }
    ).encode()


def write_canned(root: Path) -> CannedFiles:
    root.mkdir(parents=True, exist_ok=True)
    files = CannedFiles(root, len(sse_events("bench")))
    for variant in VARIANTS:
        payload = b"".join(sse_events(variant.model)) if variant.stream else completion_json(variant.model)
        files.response(variant).write_bytes(payload)
        files.models(variant).write_bytes(models_list(variant.model))
        files.body(variant).write_bytes(request_body(variant.model, variant.stream))
    return files
