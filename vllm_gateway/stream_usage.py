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

from collections import deque
from typing import Final

from .upstream import Sink
from .usage_scan import MAX_USAGE_BYTES, Counts, UsageScanner, usage_in

# The paths whose streams carry usage on request (vLLM's OpenAI server: chat and text completions).
USAGE_PATHS: Final = frozenset({"/v1/chat/completions", "/v1/completions"})
# What one token's event looks like in each kind of stream, to count what a stream delivered when its
# usage never came: a chat or text completion sends an event per token (a chat stream opens with one
# that only names the role); a Responses stream names each event, and its tokens come in `*.delta`
# events (output text, reasoning, function arguments), between events that carry none.
TOKEN_EVENTS: Final = {
    "/v1/chat/completions": (b"data: {", 1),
    "/v1/completions": (b"data: {", 0),
    "/v1/responses": (b"delta\ndata: ", 0),
}

# What sets vLLM's usage chunk apart (vLLM and the simulator write JSON without spaces).
USAGE_CHUNK: Final = b'"choices":[],'
EVENT_END: Final = b"\n\n"
# A chat or text completion stream's last event: its client takes the answer for whole on reading it.
DONE_EVENT: Final = b"data: [DONE]\n\n"
# How far from the end of what is passed on the usage chunk can begin: it is the stream's last event
# but `data: [DONE]`, a few hundred bytes, and never more than a usage object's bound and its event.
USAGE_CHUNK_WITHIN: Final = MAX_USAGE_BYTES + 4096
# What a meter keeps of an answer's end (references to its last pieces), to find the usage there: more
# than any usage object and its event. A stream of 100 events (about 23 KiB) that comes in one or two
# reads is then never searched through on its way; one that comes event by event has its older events
# counted as they leave, a few hundred bytes at a time.
TAIL_BYTES: Final = USAGE_CHUNK_WITHIN
# Where the usage of an answer that has one nearly always is: its last event or two.
NEAR_END_BYTES: Final = 4096

# pydantic's lax mode (vLLM's request models): these strings, in any case, and 0, 1, 0.0 and 1.0.
TRUE_WORDS: Final = frozenset({"1", "t", "true", "y", "yes", "on"})
FALSE_WORDS: Final = frozenset({"0", "f", "false", "n", "no", "off"})


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


class UsageMeter:
    """Between an answer's upstream and its client, for an answer that comes in pieces (a stream, a
    long body): finds its usage, counts a stream's token events (the tokens delivered, should the
    usage never come) and, when the gateway asked for the usage, holds back the usage chunk.

    It does the least per piece that it can, because a stream costs it something per piece and per
    byte: a relayed byte is cheap, and a search through every byte (bytes.find or count, about 0.4 us
    per KiB) cost a whole stream of 100 events about 20 us, as much as the rest of its relay. So the
    newest TAIL_BYTES of the answer are only kept (references to the pieces, no copies), and at the end
    the usage is searched for from the end backwards, where it is (usage_scan.usage_in): one short
    rfind. Only a piece that leaves that tail is looked through: for a long body's usage that was not
    at its end (a chat's usage sits before its `prompt_logprobs`, a megabyte or more), and for a
    stream's token events; and the tail's own events are counted only when no usage came.

    When the gateway asked for the usage, only whole events are passed on, so that the usage chunk is
    always seen whole; vLLM writes whole events, so nothing waits in practice. That chunk is a stream's
    last event but `data: [DONE]`, so only the last bytes of what is passed on are searched for it.

    What tells the client it has the whole answer waits in the meter until the relay has counted the
    answer's tokens (rest()): a stream's piece that ends in `data: [DONE]` (vLLM writes nothing after
    it but the body's end), and the latest piece of a body that is not a stream. A client that sends
    its next request on reading the end then finds the tokens counted against its key's limit."""

    __slots__ = (
        "sink",
        "strip",
        "scanner",
        "tail",
        "tail_size",
        "marker",
        "opening_events",
        "events",
        "counted_end",
        "pending",
        "hold_last",
        "held",
    )

    def __init__(self, sink: Sink, strip: bool) -> None:
        self.sink = sink
        self.strip = strip
        self.scanner = UsageScanner()  # the pieces that left the tail, in order; and a removed usage chunk
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.marker = b""  # a stream's token event, once count_events() knows it
        self.opening_events = 0
        self.events = 0  # token events in the pieces counted so far (those that left the tail)
        self.counted_end = b""  # the last bytes counted, for an event marker cut between two pieces
        self.pending = b""
        self.hold_last = True  # a body's latest piece waits for the next (or for rest())
        self.held = b""

    def count_events(self, path: str) -> None:
        """The answer is a stream of `path`'s kind: count its token events, and pass each piece on at
        once, but one that ends in `data: [DONE]`."""
        self.marker, self.opening_events = TOKEN_EVENTS.get(path, (b"", 0))
        self.hold_last = False

    def tokens(self) -> tuple[int | None, int | None]:
        """Prompt and completion tokens: the usage's; without one, the token events a stream delivered."""
        scanner = self.scanner
        if not self.strip:
            counts = self._usage_at_end()
            if counts is not None:
                return counts
            # Not in the tail: a usage that began before it, or one that went by earlier.
            for piece in self.tail:
                scanner.feed(piece)
        if scanner.prompt_tokens is not None:
            return scanner.prompt_tokens, scanner.completion_tokens
        if self.marker:
            for piece in self.tail:
                self._count_events(piece)
            return None, max(0, self.events - self.opening_events)
        return None, None

    def _usage_at_end(self) -> Counts | None:
        """The last usage in the tail: nearly always in its last KiB or so, which alone is joined and
        searched first (a stream that came event by event has a hundred pieces there)."""
        tail = self.tail
        near: list[bytes] = []
        size = 0
        for piece in reversed(tail):
            near.append(piece)
            size += len(piece)
            if size >= NEAR_END_BYTES:
                break
        counts = usage_in(near[0] if len(near) == 1 else b"".join(reversed(near)))
        if counts is None and len(near) < len(tail):
            counts = usage_in(b"".join(tail))
        return counts

    @property
    def write_paused(self) -> bool:
        return self.sink.write_paused

    async def drain(self) -> None:
        await self.sink.drain()

    def feed(self, piece: bytes) -> None:
        """A piece of the answer that went to the client some other way (with its head)."""
        if piece:
            self._keep(piece)

    def write(self, chunk: bytes) -> None:
        if self.held:
            self.sink.write(self.held)
            self.held = b""
        if self.strip:
            # The usage comes in the chunk taken out, and that search looks at every piece anyway:
            # events are counted as they pass, which costs less than keeping them.
            chunk = self._without_usage(chunk)
            if self.marker and chunk:
                self._count_events(chunk)
        else:
            # _keep, inlined: this runs for every piece of every stream.
            tail = self.tail
            tail.append(chunk)
            self.tail_size += len(chunk)
            if self.tail_size - len(tail[0]) >= TAIL_BYTES:
                self._trim()
        if self.hold_last or chunk.endswith(DONE_EVENT):
            self.held = chunk
        else:
            self.sink.write(chunk)

    def rest(self, whole_events_only: bool = False) -> bytes:
        """What the meter still holds at the end of the answer: the piece that ends it, and an
        unfinished event, which goes on as it is unless the stream failed (an error event follows,
        which must begin an event of its own)."""
        held, self.held = self.held, b""
        pending, self.pending = self.pending, b""
        if whole_events_only or not pending:
            return held
        if self.marker:
            self._count_events(pending)
        return held + pending

    def _keep(self, piece: bytes) -> None:
        self.tail.append(piece)
        self.tail_size += len(piece)
        self._trim()

    def _trim(self) -> None:
        """Pieces leave the tail while the newer ones still make TAIL_BYTES."""
        tail = self.tail
        while self.tail_size - len(tail[0]) >= TAIL_BYTES:
            old = tail.popleft()
            self.tail_size -= len(old)
            if self.marker:
                self._count_events(old)
            else:
                self.scanner.feed(old)  # a stream's usage is at its end: only a long body's is looked for here

    def _count_events(self, data: bytes) -> None:
        """Count the token events in `data`, the next bytes of the stream, one cut between the last
        bytes counted and these included (a marker is shorter than twice what is looked at there)."""
        marker = self.marker
        edge = len(marker) - 1
        self.events += data.count(marker)
        if self.counted_end:
            self.events += (self.counted_end + data[:edge]).count(marker)
        self.counted_end = (self.counted_end + data)[-edge:] if len(data) < edge else data[-edge:]

    def _without_usage(self, chunk: bytes) -> bytes:
        if self.pending:
            data, self.pending = self.pending + chunk, b""
        else:
            data = chunk
        if not data.endswith(EVENT_END):  # vLLM writes whole events: rarely
            cut = data.rfind(EVENT_END) + len(EVENT_END)
            if cut < len(EVENT_END):  # not one whole event yet
                self.pending = data
                return b""
            data, self.pending = data[:cut], data[cut:]
        if len(data) <= USAGE_CHUNK_WITHIN:
            at = data.find(USAGE_CHUNK) if USAGE_CHUNK in data else -1
        else:
            at = data.find(USAGE_CHUNK, len(data) - USAGE_CHUNK_WITHIN)
        if at < 0:
            return data
        start = data.rfind(b"data: ", 0, at)
        end = data.find(EVENT_END, at) + len(EVENT_END)
        self.scanner.feed(data[start:end])
        return data[:start] + data[end:]
