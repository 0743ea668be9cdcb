"""Finding the `usage` object in an answer's body, wherever the reads from the backend cut it.

vLLM reports a request's tokens in a `usage` object: at the end of a chat or text completion, near the
start of one with `prompt_logprobs` (whose log-probabilities of a long prompt follow it, a megabyte or
more), in a stream's usage chunk, and in the `response.completed` event of a Responses stream, the last
of a stream whose earlier events carry `"usage":null`. Its counts are `prompt_tokens` and
`completion_tokens` (chat, completions, embeddings, pooling, classify, score, rerank) or
`input_tokens` and `output_tokens` (Responses).

So every piece of the body is fed to a UsageScanner as it passes. A piece costs one bytes.find for the
key and one look at its last bytes, in C; only a piece that holds `"usage"` or ends in what may be its
start is looked at further, and only the bytes from the key to the object's closing brace are kept
across pieces. The last usage object of a body wins: a Responses answer echoes the request's tools and
schemas, where a property may be called `usage`, before its own usage; anything that is not an object
with token counts is passed over.
"""

from __future__ import annotations

from typing import Final

import orjson

# The key with its colon, as every JSON writer vLLM uses puts it (never a space before the colon): the
# string "usage" as a value (a token of the answer, in its logprobs) is then not even found.
USAGE_KEY: Final = b'"usage":'
# A usage object is a few hundred bytes. Something called usage that is longer is not vLLM's (a JSON
# schema a Responses answer echoes, say): it is passed over rather than held.
MAX_USAGE_BYTES: Final = 16 * 1024
# vLLM's usage nests two levels deep (prompt_tokens_details, output_tokens_details); beyond this many
# braces the object is not one.
MAX_BRACES: Final = 64
# The last bytes of the key's proper prefixes (`"`, `"u`, ... `"usage"`): a piece that ends in none
# of them cannot end in the start of the key.
KEY_START_ENDS: Final = frozenset(USAGE_KEY[:-1])
JSON_SPACE: Final = frozenset(b" \t\r\n")
OPEN: Final = ord("{")
# What _object_end says when the body ends before the object does, or when the key names no object.
MORE, NOT_AN_OBJECT = -1, 0


Counts = tuple[int, int | None]  # prompt (input) tokens, completion (output) tokens


def usage_in(body: bytes) -> Counts | None:
    """The counts of the last usage object of a whole body. Searched from the end, where an answer's
    usage usually is, so that a JSON answer costs one short rfind."""
    at = body.rfind(USAGE_KEY)
    while at >= 0:
        end = _object_end(body, at)
        if end > 0:
            counts = _counts(body[at + len(USAGE_KEY) : end])
            if counts is not None:
                return counts
        at = body.rfind(USAGE_KEY, 0, at)
    return None


class UsageScanner:
    """The token counts of the last usage object in the pieces fed, in order, to feed()."""

    __slots__ = ("held", "prompt_tokens", "completion_tokens")

    def __init__(self) -> None:
        # The start of a usage object (or of the key) that the next piece continues.
        self.held = b""
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, data: bytes) -> None:
        if self.held:
            data, self.held = self.held + data, b""
            self._scan(data, data.find(USAGE_KEY))
            return
        at = data.find(USAGE_KEY)
        if at >= 0 or (data and data[-1] in KEY_START_ENDS):
            self._scan(data, at)

    def _scan(self, data: bytes, at: int) -> None:
        """Read the usage objects of `data` from the key at `at` on; hold what the next piece continues."""
        while at >= 0:
            end = _object_end(data, at)
            if end == MORE:
                if len(data) - at <= MAX_USAGE_BYTES:
                    self.held = data[at:]
                    return
            elif end != NOT_AN_OBJECT:
                counts = _counts(data[at + len(USAGE_KEY) : end])
                if counts is not None:
                    self.prompt_tokens, self.completion_tokens = counts
            at = data.find(USAGE_KEY, at + len(USAGE_KEY))
        # The piece may end in the key's first bytes: they wait for the rest.
        if data and data[-1] in KEY_START_ENDS:
            for size in range(len(USAGE_KEY) - 1, 0, -1):
                if data.endswith(USAGE_KEY[:size]):
                    self.held = data[-size:]
                    return


def _counts(text: bytes) -> Counts | None:
    """The token counts of a usage object; None when it has none (an object called usage that is not one)."""
    try:
        usage = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    prompt = usage.get("prompt_tokens")
    if type(prompt) is not int:
        prompt = usage.get("input_tokens")
        if type(prompt) is not int:
            return None
    completion = usage.get("completion_tokens")
    if type(completion) is not int:
        completion = usage.get("output_tokens")
    return prompt, completion if type(completion) is int else None


def _object_end(data: bytes, at: int) -> int:
    """Where the object after the key at `at` ends (the index after its closing brace); MORE when
    `data` ends first, NOT_AN_OBJECT when the key names something else (`"usage":null`)."""
    position = at + len(USAGE_KEY)
    if data.startswith(b"{", position):  # as vLLM writes it: no spaces
        close = data.find(b"}", position + 1)
        if close >= 0 and data.find(b"{", position + 1, close) < 0:
            return close + 1  # nothing nested (a chat's usage): the first closing brace is its own
        return _closing_brace(data, position + 1)
    size = len(data)
    while position < size and data[position] in JSON_SPACE:
        position += 1
    if position == size:
        return MORE
    if data[position] != OPEN:
        return NOT_AN_OBJECT
    return _closing_brace(data, position + 1)


def _closing_brace(data: bytes, position: int) -> int:
    """The index after the brace that closes the object whose content starts at `position`; MORE
    when `data` ends first."""
    depth = 1
    for _ in range(MAX_BRACES):
        close = data.find(b"}", position)
        if close < 0:
            return MORE
        opening = data.find(b"{", position, close)
        if opening >= 0:
            depth += 1
            position = opening + 1
        else:
            depth -= 1
            position = close + 1
            if depth == 0:
                return position
    return NOT_AN_OBJECT
