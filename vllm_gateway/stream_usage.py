"""Every stream's usage, whether or not its client asked for it.

vLLM sends a stream's usage only when the request says `"stream_options": {"include_usage": true}`,
which the openai SDK does not by default. So the gateway asks on the client's behalf
(with_usage_requested) and keeps the extra chunk, the one with `"choices": []` and the usage, from a
client that did not ask (UsageChunkFilter): the client sees exactly the events it asked for, and the
ledger and token limits see the tokens.
"""

from __future__ import annotations

import orjson

from .upstream import Sink

# The paths whose streams carry usage on request (vLLM's OpenAI server: chat and text completions).
USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

# What sets vLLM's usage chunk apart (vLLM and the simulator write JSON without spaces).
USAGE_CHUNK = b'"choices":[],'
EVENT_END = b"\n\n"


def lacks_usage(payload: dict[str, object]) -> bool:
    """A streamed request whose client did not ask for the usage chunk."""
    if payload.get("stream") is not True:
        return False
    options = payload.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def with_usage_requested(body: bytes) -> bytes:
    """The body of a stream that lacks_usage(), asking vLLM for the usage chunk."""
    if b'"stream_options"' not in body:
        # Nearly always: a key added at the front, and the rest of the body left byte for byte.
        start = body.index(b"{") + 1
        return b'{"stream_options":{"include_usage":true},' + body[start:].lstrip()
    payload = orjson.loads(body)
    options = payload.get("stream_options")
    payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return orjson.dumps(payload)


class UsageChunkFilter:
    """Between a stream's upstream and its client: counts the events that pass (the tokens delivered,
    should the client leave before the usage comes) and, when the gateway asked for the usage, holds
    back the usage chunk. Only whole events are passed on then, so that the chunk is always seen
    whole; vLLM writes whole events, so nothing waits in practice."""

    __slots__ = ("sink", "strip", "events", "held")

    def __init__(self, sink: Sink, strip: bool) -> None:
        self.sink = sink
        self.strip = strip
        self.events = 0
        self.held = b""

    @property
    def write_paused(self) -> bool:
        return self.sink.write_paused

    def write(self, chunk: bytes) -> None:
        self.events += chunk.count(b"data: {")
        if self.strip:
            chunk = self._without_usage(chunk)
        self.sink.write(chunk)

    def rest(self) -> bytes:
        """What is still held at the end of the stream (an unfinished event): it goes on as it is."""
        rest, self.held = self.held, b""
        return rest

    def _without_usage(self, chunk: bytes) -> bytes:
        data = self.held + chunk if self.held else chunk
        cut = data.rfind(EVENT_END) + len(EVENT_END)
        if cut < len(EVENT_END):
            self.held = data
            return b""
        if cut < len(data):
            data, self.held = data[:cut], data[cut:]
        else:
            self.held = b""
        at = data.find(USAGE_CHUNK)
        if at < 0:
            return data
        start = data.rfind(b"data: ", 0, at)
        end = data.find(EVENT_END, at) + len(EVENT_END)
        return data[:start] + data[end:]
