"""Reading token counts as vLLM writes them: the usage object wherever the reads cut the body, in each
shape vLLM's endpoints answer, and `stream`/`include_usage` read as vLLM's pydantic models read them."""

from __future__ import annotations

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from vllm_gateway.stream_usage import lacks_usage, lax_bool, with_usage_requested
from vllm_gateway.usage_scan import UsageScanner, usage_in

CHAT_USAGE = {
    "prompt_tokens": 12,
    "total_tokens": 19,
    "completion_tokens": 7,
    "prompt_tokens_details": None,
    "completion_tokens_details": None,
}
RESPONSES_USAGE = {
    "input_tokens": 21,
    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "input_tokens_per_turn": []},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0, "output_tokens_per_turn": []},
    "total_tokens": 26,
}
# Bodies in the order vLLM writes their fields, each with things named "usage" that are not its usage.
BODIES = {
    "chat with prompt_logprobs": (
        orjson.dumps(
            {
                "id": "chatcmpl-1",
                "choices": [{"message": {"content": 'the "usage": {"prompt_tokens": 1} of words'}}],
                "usage": CHAT_USAGE,
                "prompt_logprobs": [None] + [{"7": {"logprob": -1.5, "rank": 1, "decoded_token": "usage"}}] * 50,
            }
        ),
        (12, 7),
    ),
    "responses echoing a schema with a usage property": (
        orjson.dumps(
            {
                "id": "resp_1",
                "tools": [{"parameters": {"properties": {"usage": {"type": "object", "properties": {}}}}}],
                "usage": RESPONSES_USAGE,
                "user": None,
            }
        ),
        (21, 5),
    ),
    "chat stream whose client asked for continuous usage": (
        b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":{"prompt_tokens":4,"completion_tokens":1}}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":4,"total_tokens":7,"completion_tokens":3}}\n\n'
        b"data: [DONE]\n\n",
        (4, 3),
    ),
    "responses stream": (
        b'event: response.created\ndata: {"response":{"usage":null},"type":"response.created"}\n\n'
        b'event: response.output_text.delta\ndata: {"delta":"x","type":"response.output_text.delta"}\n\n'
        b'event: response.completed\ndata: {"response":{"output":[],"usage":'
        + orjson.dumps(RESPONSES_USAGE)
        + b',"user":null},"type":"response.completed"}\n\n',
        (21, 5),
    ),
    "rerank": (
        b'{"id":"rerank-1","model":"m","usage":{"prompt_tokens":30,"total_tokens":30},"results":[]}',
        (30, None),
    ),
    "spaced JSON": (b'{"usage":\r\n {"prompt_tokens": 3, "completion_tokens": 0}}', (3, 0)),
}


def scanned(*pieces: bytes) -> tuple[int | None, int | None]:
    scanner = UsageScanner()
    for piece in pieces:
        scanner.feed(piece)
    return scanner.prompt_tokens, scanner.completion_tokens


@pytest.mark.parametrize("name", BODIES)
def test_usage_is_found_however_two_cuts_divide_the_body(name):
    body, counts = BODIES[name]
    usage_at = body.rfind(b'"usage":{')
    positions = range(max(0, usage_at - 10), min(len(body), usage_at + 220))
    for first in positions:
        for second in range(first, min(len(body), first + 40)):
            assert scanned(body[:first], body[first:second], body[second:]) == counts, (first, second)


@pytest.mark.parametrize("name", BODIES)
def test_usage_is_found_in_a_body_read_a_byte_at_a_time_or_whole(name):
    body, counts = BODIES[name]
    assert scanned(*(body[index : index + 1] for index in range(len(body)))) == counts
    assert usage_in(body) == counts


def test_a_body_without_a_usage_object_has_no_counts():
    assert scanned(b'{"usage":null,"x":"usage","y":{"usage":{"type":"object"}}}') == (None, None)
    assert usage_in(b'{"usage":null,"x":"usage","y":{"usage":{"type":"object"}}}') is None
    assert scanned(b'{"usage":{"prompt_tokens":true}}', b"") == (None, None)


def test_a_usage_object_cut_off_by_the_end_of_the_body_is_not_read():
    assert scanned(b'{"usage":{"prompt_tokens":5,"completion_tokens":', b"2") == (None, None)


# Every value that might spell a boolean: pydantic's lax mode (vLLM's request models) decides.
SPELLINGS: list[object] = [
    True, False, None, 0, 1, 2, -1, 0.0, -0.0, 1.0, 0.5, 1e30,
    "true", "True", "TRUE", "tRuE", "false", "1", "0", "yes", "no", "y", "n", "on", "off", "On", "t", "f",
    "", " true", "true ", "1.0", "yes please", [], {}, [True],
]  # fmt: skip


@pytest.mark.parametrize("value", SPELLINGS, ids=repr)
def test_lax_bool_reads_a_value_as_pydantics_lax_mode_does(value):
    try:
        expected = TypeAdapter(bool | None).validate_python(value)
    except ValidationError:
        assert lax_bool(value) is None
    else:
        assert lax_bool(value) == expected


@pytest.mark.parametrize(
    ("payload", "lacks"),
    [
        ({"stream": 1}, True),
        ({"stream": "true", "stream_options": {"include_usage": "off"}}, True),
        ({"stream": "yes", "stream_options": {}}, True),
        ({"stream": True, "stream_options": {"include_usage": None}}, True),
        ({"stream": True, "stream_options": {"include_usage": "on"}}, False),  # asked for, as vLLM reads it
        ({"stream": True, "stream_options": {"include_usage": "maybe"}}, False),  # vLLM answers 400
        ({"stream": True, "stream_options": {"continuous_usage_stats": "maybe"}}, False),  # 400 too
        ({"stream": True, "stream_options": "yes"}, False),  # 400 too
        ({"stream": "false"}, False),
        ({"stream": 2}, False),
        ({}, False),
    ],
)
def test_a_stream_lacks_usage_exactly_when_vllm_would_stream_without_it(payload, lacks):
    assert lacks_usage(payload) is lacks


def test_the_usage_request_goes_last_so_it_wins_over_any_spelling_of_the_clients_key():
    body = b'{"model":"m","stream":1,"stream\\u005foptions":{"include_usage":false,"continuous_usage_stats":1}}\n'
    sent = orjson.loads(with_usage_requested(body))
    assert sent == {"model": "m", "stream": 1, "stream_options": {"include_usage": True}}
    assert with_usage_requested(body).startswith(body.rstrip()[:-1])  # the client's bytes, unchanged


# ---- the meter between a stream's backend and its client ----------------------------------------


class Collected:
    """A client's side of the relay: what the meter passes on."""

    write_paused = False

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.parts.append(chunk)


def chat_stream(tokens: int, padding: int) -> bytes:
    """A chat stream as vLLM writes it: a role event, a token event each, the usage chunk, [DONE]."""
    events = [{"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{"id": "c", "choices": [{"index": 0, "delta": {"content": " w" + "x" * padding}}]}] * tokens
    events.append({"id": "c", "choices": [], "usage": CHAT_USAGE | {"completion_tokens": tokens}})
    return b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("strip", [False, True], ids=["usage-asked-for", "usage-removed"])
@pytest.mark.parametrize(("tokens", "padding"), [(30, 0), (300, 200)], ids=["short", "beyond-the-tail"])
def test_a_stream_cut_anywhere_reaches_the_client_whole_and_counted(strip, tokens, padding):
    import random

    from vllm_gateway.stream_usage import UsageMeter

    stream = chat_stream(tokens, padding)
    usage_event = stream.rindex(b"data: {")
    expected = stream[:usage_event] + stream[stream.index(b"\n\n", usage_event) + 2 :] if strip else stream
    chooser = random.Random(tokens + strip)
    for _ in range(200):
        cuts = sorted(chooser.sample(range(1, len(stream)), chooser.randint(1, 40)))
        client = Collected()
        meter = UsageMeter(client, strip)
        meter.count_events("/v1/chat/completions")
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            meter.write(stream[start:end])
        client.write(meter.rest())
        assert b"".join(client.parts) == expected, cuts
        assert meter.tokens() == (12, tokens), cuts


@pytest.mark.parametrize("strip", [False, True], ids=["usage-asked-for", "usage-removed"])
def test_a_stream_without_its_usage_counts_the_token_events_it_delivered(strip):
    from vllm_gateway.stream_usage import UsageMeter

    stream = chat_stream(300, 200)
    cut = stream.rindex(b"data: {")  # the usage never came: the client left, or the backend died
    for piece_size in (1, 7, 250, 4096, len(stream)):
        meter = UsageMeter(Collected(), strip)
        meter.count_events("/v1/chat/completions")
        for start in range(0, cut, piece_size):
            meter.write(stream[start : min(cut, start + piece_size)])
        meter.rest()
        assert meter.tokens() == (None, 300), piece_size


@pytest.mark.parametrize("strip", [False, True], ids=["usage-asked-for", "usage-removed"])
def test_a_streams_events_pass_at_once_but_the_piece_ending_in_done_waits_for_the_end(strip):
    from vllm_gateway.stream_usage import UsageMeter

    stream = chat_stream(3, 0)
    last = stream.rindex(b"data: {")  # the usage chunk, then [DONE]
    client = Collected()
    meter = UsageMeter(client, strip)
    meter.count_events("/v1/chat/completions")
    meter.write(stream[:last])
    assert b"".join(client.parts) == stream[:last]  # each token's event as it came
    meter.write(stream[last:])
    assert b"".join(client.parts) == stream[:last]  # the end: not before the tokens are counted
    end = meter.rest()
    assert end.endswith(b"data: [DONE]\n\n") and (b'"usage"' in end) is not strip
    assert meter.tokens() == (12, 3)


def test_a_body_in_pieces_keeps_its_latest_piece_until_the_end():
    from vllm_gateway.stream_usage import UsageMeter

    body = b'{"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
    client = Collected()
    meter = UsageMeter(client, strip=False)
    for start in range(0, len(body), 10):
        meter.write(body[start : start + 10])
        assert b"".join(client.parts) == body[:start]  # a client of a sized body has it whole at its last byte
    assert b"".join(client.parts) + meter.rest() == body
    assert meter.tokens() == (5, 2)
