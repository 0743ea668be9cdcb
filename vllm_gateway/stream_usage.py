"""Every answer's usage, whether or not its client asked for it, and what a stream delivered.

vLLM sends a stream's usage only when the request says `"stream_options": {"include_usage": true}`,
which the openai SDK does not by default. So the gateway asks on the client's behalf
(with_usage_requested) and keeps the extra chunk, the one with `"choices": []` and the usage, from a
client that did not ask (UsageMeter): the client sees exactly the events it asked for, and the
ledger and token limits see the tokens.

Whether a request is a stream, and whether it asked for the usage, is decided as vLLM decides it:
vLLM's request models are pydantic models in lax mode, where `"stream": 1`, `"stream": "true"` or
`"include_usage": "on"` are booleans too (lax_bool). A client that spells its stream so must not get
it uncounted.
"""

from __future__ import annotations

from .upstream import Sink
from .usage_scan import KEY_START_ENDS, USAGE_KEY, UsageScanner

# The paths whose streams carry usage on request (vLLM's OpenAI server: chat and text completions).
USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# What one token's event looks like in each kind of stream, to count what a stream delivered when its
# usage never came: a chat or text completion sends an event per token (a chat stream opens with one
# that only names the role); a Responses stream names each event, and its tokens come in `*.delta`
# events (output text, reasoning, function arguments), between events that carry none.
TOKEN_EVENTS = {
    "/v1/chat/completions": (b"data: {", 1),
    "/v1/completions": (b"data: {", 0),
    "/v1/responses": (b"delta\ndata: ", 0),
}

# What sets vLLM's usage chunk apart (vLLM and the simulator write JSON without spaces).
USAGE_CHUNK = b'"choices":[],'
EVENT_END = b"\n\n"

# pydantic's lax mode (vLLM's request models): these strings, in any case, and 0, 1, 0.0 and 1.0.
TRUE_WORDS = frozenset({"1", "t", "true", "y", "yes", "on"})
FALSE_WORDS = frozenset({"0", "f", "false", "n", "no", "off"})


def lax_bool(value: object) -> bool | None:
    """The boolean pydantic's lax mode reads `value` as, or None when it reads none (vLLM answers 400)."""
    if value is True or value is False:
        return value
    if type(value) is int or type(value) is float:
        return True if value == 1 else False if value == 0 else None
    if isinstance(value, str):
        word = value.lower()
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None
    return None


def lacks_usage(payload: dict[str, object]) -> bool:
    """A request vLLM will stream without the usage chunk: `stream` is true as vLLM reads it, and
    `stream_options.include_usage` is not. A stream_options vLLM would refuse is left for it to refuse."""
    stream = payload.get("stream")
    if stream is not True and (stream is None or stream is False or lax_bool(stream) is not True):
        return False
    options = payload.get("stream_options")
    if options is None:
        return True
    if not isinstance(options, dict):
        return False
    include = options.get("include_usage")
    if include is not None and lax_bool(include) is not False:
        return False  # asked for (or not a boolean: a 400)
    continuous = options.get("continuous_usage_stats")
    return continuous is None or lax_bool(continuous) is not None


def with_usage_requested(body: bytes) -> bytes:
    """The body of a request that lacks_usage(), asking vLLM for the usage chunk.

    The key goes last: where a JSON object names a key twice, vLLM (Python's json) and the gateway
    (orjson) both take the last, so it replaces whatever stream_options the client sent, however its
    key was spelt (`"stream\\u005foptions"` is the same key). It replaces continuous_usage_stats too,
    which vLLM honours only with include_usage: that client never got usage in every chunk, and still
    does not. The rest of the body is left byte for byte."""
    end = body.rstrip().rindex(b"}")
    return body[:end] + b',"stream_options":{"include_usage":true}}'


class UsageMeter(UsageScanner):
    """Between an answer's upstream and its client, for an answer that comes in pieces (a stream, a
    long body): finds the usage in every piece that passes (UsageScanner), counts a stream's token
    events (the tokens delivered, should the usage never come) and, when the gateway asked for the
    usage, holds back the usage chunk. Only whole events are passed on then, so that the chunk is
    always seen whole; vLLM writes whole events, so nothing waits in practice. The usage is then in
    that chunk and nowhere else (the gateway's stream_options turned continuous usage off), so the
    chunk is all that is scanned."""

    __slots__ = ("sink", "strip", "marker", "opening_events", "events", "pending")

    def __init__(self, sink: Sink, strip: bool) -> None:
        super().__init__()
        self.sink = sink
        self.strip = strip
        self.marker = b""  # a stream's token event, once count_events() knows it
        self.opening_events = 0
        self.events = 0
        self.pending = b""

    def count_events(self, path: str) -> None:
        """The answer is a stream of `path`'s kind: count its token events."""
        self.marker, self.opening_events = TOKEN_EVENTS.get(path, (b"", 0))

    def tokens(self) -> tuple[int | None, int | None]:
        """Prompt and completion tokens: the usage's; without one, the token events a stream delivered."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens, self.completion_tokens
        if self.marker:
            return None, max(0, self.events - self.opening_events)
        return None, None

    @property
    def write_paused(self) -> bool:
        return self.sink.write_paused

    def write(self, chunk: bytes) -> None:
        if self.marker:
            self.events += chunk.count(self.marker)
        if self.strip:
            chunk = self._without_usage(chunk)
        elif self.held:
            self.feed(chunk)
        else:
            # UsageScanner.feed, inlined: this runs for every piece of every stream.
            at = chunk.find(USAGE_KEY)
            if at >= 0 or (chunk and chunk[-1] in KEY_START_ENDS):
                self._scan(chunk, at)
        self.sink.write(chunk)

    def rest(self) -> bytes:
        """What is still held at the end of the stream (an unfinished event): it goes on as it is."""
        rest, self.pending = self.pending, b""
        return rest

    def _without_usage(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        cut = data.rfind(EVENT_END) + len(EVENT_END)
        if cut < len(EVENT_END):
            self.pending = data
            return b""
        if cut < len(data):
            data, self.pending = data[:cut], data[cut:]
        else:
            self.pending = b""
        at = data.find(USAGE_CHUNK)
        if at < 0:
            return data
        start = data.rfind(b"data: ", 0, at)
        end = data.find(EVENT_END, at) + len(EVENT_END)
        self.feed(data[start:end])
        return data[:start] + data[end:]
