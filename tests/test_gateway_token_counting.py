"""Every token counted, whatever the client sends: streams spelt as vLLM reads them, a usage request
under an escaped key, Responses usage, usage wherever the backend's writes cut the body, streams the
backend cuts, and the prompt of requests whose client gave up. Each is checked in the request's log
line, and the ledger, the metrics and the key's token window where they could differ.

The gateway runs in the test's process (tests/support/memory_gateway.py) in front of simulator processes;
a gateway process stays for what the openai SDK makes of a cut stream, and for a prompt still being
counted when the process is stopped (its ledger read with the `usage` command).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.clients import client_tls
from tests.support.gateway import Backend, Gateway, raw_post
from tests.support.http_wire import WireResponse
from tests.support.memory_gateway import LIVENESS, MemoryGateway
from tests.support.processes import Simulator, wait_until
from vllm_gateway.stream_usage import USAGE_PATHS, UsageMeter, lacks_usage, with_usage_requested
from vllm_gateway.usage_scan import usage_in

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = [{"role": "user", "content": "one two three"}]  # three prompt tokens for the simulator
FLUSH = {"GATEWAY_USAGE_FLUSH_SECONDS": "0.2"}
LOGGED = re.compile(r" prompt_tokens=(\S+) completion_tokens=(\S+)(?: prompt_from=(\S+))?")


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    """A fast simulator with room for a prompt of tens of thousands of tokens."""
    with Simulator.start(tmp_path_factory.mktemp("sim"), "--max-model-len", "65536") as simulator:
        yield simulator


@pytest.fixture(scope="module")
def memory_gateway(tmp_path_factory, simulator):
    """The gateway in the test's process, its ledger written every 0.2 s."""
    backends = [Backend("sim", simulator.base_url)]
    with MemoryGateway.start(tmp_path_factory.mktemp("memory-gw"), backends, env=FLUSH) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    """A gateway process, for the openai SDK's test."""
    with Gateway.start(tmp_path_factory.mktemp("gw"), [Backend("sim", simulator.base_url)], env=FLUSH) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def _no_faults_left(request):
    yield
    for name in ("simulator", "slow_simulator"):
        if name in request.fixturenames:
            request.getfixturevalue(name).clear_faults()


def request_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


def post(
    gateway: MemoryGateway, path: str, body: dict | bytes, rid: str, key: str | None = None, timeout: float = LIVENESS
) -> WireResponse:
    """The body as given (bytes go byte for byte), under the request id `rid`."""
    return gateway.exchange(raw_post(key or gateway.key, body, path=path, extra=f"X-Request-ID: {rid}\r\n"), timeout)


def log_line(path: Path, rid: str) -> str | None:
    """The request's line in the gateway's log, once it is written."""
    text = path.read_text() if path.exists() else ""
    return next((row for row in text.splitlines() if f" rid={rid} " in row), None)


def counts_in(line: str) -> tuple[int | None, int | None, str | None]:
    """The prompt tokens, completion tokens and prompt source a log line states (None for each it does not)."""
    match = LOGGED.search(line)
    if match is None:
        return None, None, None
    prompt, completion, source = match.groups()
    number = lambda text: None if text == "None" else int(text)  # noqa: E731
    return number(prompt), number(completion), source


def logged(
    gateway: MemoryGateway, rid: str, timeout: float = 10.0
) -> tuple[str, tuple[int | None, int | None, str | None]]:
    """The request's log line and what it counts; the loop runs until the line is written (a request is
    counted and logged after its answer)."""
    path = gateway.state.settings.log_path
    gateway.until(lambda: log_line(path, rid) is not None, timeout, what=f"a log line for {rid}", interval=0.01)
    line = log_line(path, rid)
    assert line is not None
    return line, counts_in(line)


def tokens_of(gateway: MemoryGateway, rid: str, timeout: float = 10.0) -> tuple[int | None, int | None, str | None]:
    return logged(gateway, rid, timeout)[1]


def remaining_tokens(gateway: MemoryGateway, key: str) -> int:
    """The key's token window as the next request finds it."""
    answer = post(gateway, CHAT, {"model": "sim", "messages": MESSAGES, "max_tokens": 1}, request_id("probe"), key)
    remaining = answer.header("x-ratelimit-remaining-tokens")
    assert remaining is not None, answer.summary()
    return int(remaining)


def limited_key(gateway: MemoryGateway, limit: str) -> str:
    return gateway.create_key(request_id("limited"), token_limit=limit)[1]


def sse_data(body: bytes) -> list[dict]:
    """The JSON objects of a stream's `data:` lines, in order ([DONE] left out)."""
    lines = body.decode().splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


# ---- (a) `stream` and `include_usage` as vLLM reads them ----------------------------------------


@pytest.mark.parametrize(
    ("path", "stream"),
    [(CHAT, 1), (CHAT, "true"), (CHAT, "Yes"), (CHAT, 1.0), (COMPLETIONS, "on")],
    ids=["chat-1", "chat-true", "chat-Yes", "chat-1.0", "completions-on"],
)
def test_a_stream_spelt_as_vllm_reads_a_boolean_is_counted_and_its_client_sees_no_usage_chunk(
    memory_gateway, simulator, path, stream
):
    rid = request_id("lax-stream")
    body = {"model": "sim", "max_tokens": 5, "stream": stream}
    body |= {"messages": MESSAGES} if path == CHAT else {"prompt": "one two three"}
    answer = post(memory_gateway, path, body, rid)
    assert answer.status == 200 and answer.body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in answer.body  # the client did not ask for it
    assert simulator.stats()["last_request"]["body"]["stream_options"] == {"include_usage": True}
    assert tokens_of(memory_gateway, rid) == (3, 5, None)


@pytest.mark.parametrize("include_usage", ["yes", 1, "TRUE"])
def test_a_client_asking_for_usage_with_a_lax_boolean_gets_its_usage_chunk(memory_gateway, include_usage):
    rid = request_id("lax-usage")
    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    answer = post(memory_gateway, CHAT, body | {"stream_options": {"include_usage": include_usage}}, rid)
    assert answer.body.count(b'"choices":[],') == 1
    assert tokens_of(memory_gateway, rid) == (3, 4, None)


@pytest.mark.parametrize("options", [{"include_usage": "maybe"}, {"include_usage": False, "continuous_usage_stats": 7}])
def test_stream_options_vllm_refuses_reach_it_unchanged_and_are_refused(memory_gateway, simulator, options):
    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 4, "stream": True, "stream_options": options}
    answer = post(memory_gateway, CHAT, body, request_id("refused-options"))
    assert answer.status == 400, answer.summary()
    assert simulator.stats()["last_request"]["body"]["stream_options"] == options


# ---- (b) the key decided from the parsed body, not from its bytes ---------------------------------


@pytest.mark.parametrize(
    "options",
    [
        rb'"stream\u005foptions":{"include_usage":false}',
        rb'"stream_options":{"include_usage":true},"stream_options":{"include_usage":false}',
        rb'"\u0073tream_options":{"include_usage":0}',
    ],
    ids=["escaped", "given-twice", "escaped-first-letter"],
)
def test_include_usage_false_under_any_spelling_of_its_key_is_counted_all_the_same(memory_gateway, simulator, options):
    rid = request_id("escaped")
    body = b'{"model":"sim","messages":[{"role":"user","content":"one two three"}],"max_tokens":5,"stream":true,'
    answer = post(memory_gateway, CHAT, body + options + b"}", rid)
    assert answer.status == 200
    assert b'"usage"' not in answer.body
    assert simulator.stats()["last_request"]["body"]["stream_options"] == {"include_usage": True}
    assert tokens_of(memory_gateway, rid) == (3, 5, None)


# ---- (c) the Responses API ----------------------------------------------------------------------


def test_responses_usage_is_counted_whole_and_streamed(memory_gateway):
    whole_id, stream_id = request_id("responses"), request_id("responses-stream")
    whole_body = {"model": "sim", "input": "one two three", "max_output_tokens": 4}
    stream_body = {
        "model": "sim",
        "instructions": "be brief",
        "input": [{"role": "user", "content": "one two three"}],
        "max_output_tokens": 6,
        "stream": True,
    }
    whole = post(memory_gateway, RESPONSES, whole_body, whole_id)
    streamed = post(memory_gateway, RESPONSES, stream_body, stream_id)
    assert whole.status == 200 and streamed.status == 200
    usage = json.loads(whole.body)["usage"]
    assert usage is not None and (usage["input_tokens"], usage["output_tokens"]) == (3, 4)
    assert sse_data(streamed.body)[-1]["type"] == "response.completed"
    assert tokens_of(memory_gateway, whole_id) == (3, 4, None)
    assert tokens_of(memory_gateway, stream_id) == (5, 6, None)


# ---- (d) usage wherever the reads cut the body ----------------------------------------------------


def test_the_usage_before_megabytes_of_prompt_logprobs_is_counted(memory_gateway):
    rid = request_id("prompt-logprobs")
    words = 30_000
    body = {"model": "sim", "messages": [{"role": "user", "content": "lorem " * words}], "max_tokens": 3}
    answer = post(memory_gateway, CHAT, body | {"prompt_logprobs": 1}, rid, timeout=60)
    assert answer.status == 200
    assert len(answer.body) > 1_000_000
    assert answer.body.index(b'"usage"') < 1000  # before the log-probabilities, as vLLM writes it
    assert tokens_of(memory_gateway, rid) == (words, 3, None)


def usage_span(content: bytes) -> tuple[int, int]:
    """Where the last usage object of an answer starts (its key) and ends (after its closing brace)."""
    start = content.rindex(b'"usage":{')
    return start, content.index(b"}", content.index(b"}", start) + 1) + 1


# The answers whose usage the cuts move around, as the gateway's tests send them: the simulator
# counts three prompt tokens and writes three.
CUT_ANSWERS = {
    "chat": (CHAT, {"model": "sim", "messages": MESSAGES, "max_tokens": 3}),
    "chat-stream": (CHAT, {"model": "sim", "messages": MESSAGES, "max_tokens": 3, "stream": True}),
    "chat-stream-with-usage": (
        CHAT,
        {
            "model": "sim",
            "messages": MESSAGES,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    "responses": (RESPONSES, {"model": "sim", "input": "one two three", "max_output_tokens": 3}),
    "responses-stream": (RESPONSES, {"model": "sim", "input": "one two three", "max_output_tokens": 3, "stream": True}),
}


def backend_answer(simulator: Simulator, path: str, body: dict) -> tuple[bytes, bool, bool]:
    """The answer's bytes as the gateway gets them (it asks for a chat stream's usage on its client's
    behalf; an id of the same length gives the same offsets), whether it is a stream, and whether the
    gateway keeps its usage chunk from the client (the client did not ask for it)."""
    strip = path in USAGE_PATHS and lacks_usage(body)
    probe = with_usage_requested(json.dumps(body).encode()) if strip else json.dumps(body).encode()
    headers = {"X-Request-ID": "cut-00000", "Content-Type": "application/json"}
    direct = httpx.post(simulator.base_url + path, content=probe, headers=headers, timeout=30, verify=client_tls())
    assert direct.status_code == 200, direct.text
    return direct.content, "text/event-stream" in direct.headers["content-type"], strip


class Client:
    """The client's side of the relay: what reaches it."""

    write_paused = False

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.parts.append(chunk)


def relayed(path: str, reads: list[bytes], streaming: bool, strip: bool) -> tuple[bytes, tuple[int | None, int | None]]:
    """What proxy.relay makes of an answer whose body reaches it in `reads`: the bytes its client
    gets, and the tokens counted. As the relay does it: a body that is not a stream is read once
    before its head goes out, and when that read holds it whole it is looked through then (usage_in);
    anything else goes to the client through a UsageMeter, the first read with the head (`feed`),
    each later one as it comes (`write`), what the meter held back at the end (`rest`), and the
    meter's count once the body is done (`tokens`)."""
    client = Client()
    first, later = (b"", reads) if streaming else (reads[0], reads[1:])
    if not streaming and not later:
        client.write(first)
        return first, usage_in(first) or (None, None)
    meter = UsageMeter(client, strip and streaming)
    client.write(first)
    meter.feed(first)
    if streaming:
        meter.count_events(path)
    for piece in later:
        meter.write(piece)
    client.write(meter.rest())
    return b"".join(client.parts), meter.tokens()


def written_in_events(content: bytes) -> list[int]:
    """The offsets where the backend's writes end: a stream's events, each written on its own."""
    ends, at = [], content.find(b"\n\n")
    while at >= 0:
        ends.append(at + 2)
        at = content.find(b"\n\n", at + 2)
    return ends


@pytest.mark.parametrize("shape", CUT_ANSWERS)
def test_the_relay_counts_the_usage_and_passes_the_body_on_whichever_bytes_its_reads_end_at(simulator, shape):
    """Every cut of the answer, as function calls: in two reads; as the backend writes it (event by
    event) with the cut among its writes; and in pieces of a few bytes. The usage is counted, and the
    client gets the body byte for byte (without the usage chunk the gateway asked for on its behalf)."""
    path, body = CUT_ANSWERS[shape]
    content, streaming, strip = backend_answer(simulator, path, body)
    expected = content
    if strip:
        usage_event = content.rindex(b"data: ", 0, content.index(b'"choices":[],'))
        expected = content[:usage_event] + content[content.index(b"\n\n", usage_event) + 2 :]
    assert relayed(path, [content], streaming, strip) == (expected, (3, 3))  # in one read

    def cut_at(offsets: list[int]) -> list[bytes]:
        edges = [0, *sorted(set(offsets) - {0, len(content)}), len(content)]
        return [content[start:end] for start, end in itertools.pairwise(edges)]

    layouts: dict[str, list[bytes]] = {}
    writes = written_in_events(content) if streaming else []
    for position in range(1, len(content)):
        layouts[f"two reads, cut at {position}"] = cut_at([position])
        if streaming:
            layouts[f"events, cut at {position}"] = cut_at([*writes, position])
    for size in (1, 2, 3, 5, 7, 16, 100):
        layouts[f"pieces of {size}"] = cut_at(list(range(size, len(content), size)))
    outcomes = {name: relayed(path, reads, streaming, strip) for name, reads in layouts.items()}
    assert {name: outcome for name, outcome in outcomes.items() if outcome != (expected, (3, 3))} == {}


@pytest.mark.parametrize("shape", CUT_ANSWERS)
def test_the_usage_is_counted_wherever_the_backends_writes_cut_it(memory_gateway, simulator, shape):
    """The relay's wiring, for a few of the cuts the test above makes: the backend's writes end just
    before the usage, inside its key, inside the object, right after it, after the first byte and
    before the last, and in sixteen pieces."""
    path, body = CUT_ANSWERS[shape]
    content, _, _ = backend_answer(simulator, path, body)
    start, end = usage_span(content)
    counted = {}
    # The request ids are as long as backend_answer's, for the same offsets, and differ from shape to
    # shape: the module's gateway logs every shape's requests, and each must find its own line.
    shape_number = list(CUT_ANSWERS).index(shape)
    for position in (start, start + 4, (start + end) // 2, end, 1, len(content) - 1):
        simulator.set_faults(split_body_at=position)
        counted[position] = rid = f"cut{shape_number}{position:05d}"
        assert post(memory_gateway, path, body, rid).status == 200
    simulator.set_faults(body_piece_bytes=len(content) // 16 + 1)
    counted[-16] = rid = request_id("pieces")
    assert post(memory_gateway, path, body, rid).status == 200
    expected = (3, 3, None)
    counts = {position: tokens_of(memory_gateway, rid) for position, rid in counted.items()}
    assert counts == dict.fromkeys(counted, expected)


# ---- (e) a stream the backend cuts -----------------------------------------------------------------


def ledger(gateway: MemoryGateway) -> tuple[int, int, int]:
    """Requests, input and output tokens in the ledger, once earlier batches are written (the loop runs
    between two reads: the ledger writes its batches from it)."""

    def read() -> tuple[int, int, int]:
        query = {"start_time": int(time.time()) - 3600, "bucket_width": "1d"}
        with gateway.http(gateway.admin_key) as client:
            data = client.get("/admin/usage", params=query).json()["data"]
        results = [result for bucket in data for result in bucket["results"]]
        return (
            sum(r["num_model_requests"] for r in results),
            sum(r["input_tokens"] for r in results),
            sum(r["output_tokens"] for r in results),
        )

    last = read()
    while True:
        gateway.run(0.6)
        now = read()
        if now == last:
            return now
        last = now


def metric(gateway: MemoryGateway, name: str) -> float:
    with gateway.http() as client:
        text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_stream_the_backend_cuts_counts_its_prompt_and_what_it_delivered_everywhere(memory_gateway, simulator):
    key = limited_key(memory_gateway, "100000/hour")
    before_ledger = ledger(memory_gateway)
    before_prompt = metric(memory_gateway, "vllm_gateway_prompt_tokens_total")
    before_completion = metric(memory_gateway, "vllm_gateway_completion_tokens_total")
    simulator.set_faults(crash_after_tokens=30)
    rid = request_id("cut-stream")
    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 2000, "stream": True}
    answer = post(memory_gateway, CHAT, body, rid, key)
    simulator.clear_faults()
    text = answer.body.decode()
    delivered = text.count('"content":"') - 1  # the first event names the role
    assert answer.status == 200 and "upstream_error" in text and delivered == 30
    line, counts = logged(memory_gateway, rid)
    assert " status=502 " in line
    assert counts == (3, 30, "tokenize")  # the simulator's /tokenize counted the prompt
    after_ledger = ledger(memory_gateway)
    assert (after_ledger[1] - before_ledger[1], after_ledger[2] - before_ledger[2]) == (3, 30)
    assert metric(memory_gateway, "vllm_gateway_prompt_tokens_total") - before_prompt == 3
    assert metric(memory_gateway, "vllm_gateway_completion_tokens_total") - before_completion == 30
    assert remaining_tokens(memory_gateway, key) == 100000 - 33


def test_a_stream_whose_backend_died_counts_an_estimated_prompt(tmp_path):
    body = json.dumps(
        {
            "model": "sim",
            "messages": MESSAGES,
            "max_tokens": 2000,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    with Simulator.start(tmp_path, "--exit-after-tokens", "10") as dying:
        with MemoryGateway.start(tmp_path / "gw", [Backend("sim", dying.base_url)]) as gateway:
            rid = request_id("died")
            answer = post(gateway, CHAT, body, rid)
            line, counts = logged(gateway, rid)
    assert "upstream_error" in answer.body.decode() and " status=502 " in line
    # Nobody is left to tokenize it: the body's bytes / 4, and the line says so.
    assert counts == (math.ceil(len(body) / 4), 10, "estimate")


# ---- (f) the prompt of a request given up on ------------------------------------------------------


@pytest.fixture(scope="module")
def slow_simulator(tmp_path_factory):
    """Five tokens a second: a client can give up on a request in the middle of it."""
    with Simulator.start(tmp_path_factory.mktemp("slow"), "--token-rate", "5") as simulator:
        yield simulator


@pytest.fixture(scope="module")
def slow_gateway(tmp_path_factory, slow_simulator):
    env = {**FLUSH, "GATEWAY_PROMPT_COUNT_TIMEOUT": "0.5"}
    with MemoryGateway.start(
        tmp_path_factory.mktemp("slow-gw"), [Backend("sim", slow_simulator.base_url)], env=env
    ) as gateway:
        yield gateway


def give_up(gateway: MemoryGateway, path: str, body: bytes, key: str | None = None) -> str:
    """Send a request and leave after a second, before its answer; its request id."""
    rid = request_id("given-up")
    connection = gateway.connect()
    connection.send(raw_post(key or gateway.key, body, path=path, extra=f"X-Request-ID: {rid}\r\n"))
    gateway.run(1.0)  # the client's patience
    assert connection.take() == b"", "answered within the second"
    connection.disconnect()
    return rid


def give_up_on_process(gateway: Gateway, path: str, body: bytes) -> None:
    """give_up, on a gateway process: the client's read times out after a second."""
    rid = request_id("given-up")
    headers = {"Authorization": f"Bearer {gateway.key}", "X-Request-ID": rid, "Content-Type": "application/json"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + path, content=body, headers=headers, timeout=1.0, verify=client_tls())


def test_a_non_streamed_request_given_up_on_counts_its_prompt(slow_gateway, slow_simulator):
    key = limited_key(slow_gateway, "100000/hour")
    prompt = " ".join(["lorem"] * 40)
    body = json.dumps({"model": "sim", "messages": [{"role": "user", "content": prompt}], "max_tokens": 50})
    rid = give_up(slow_gateway, CHAT, body.encode(), key)
    line, counts = logged(slow_gateway, rid)
    assert " status=499 " in line
    assert counts == (40, None, "tokenize")
    assert remaining_tokens(slow_gateway, key) == 100000 - 40


def test_a_prompt_tokenize_cannot_count_in_time_is_estimated_within_the_timeout(slow_gateway, slow_simulator):
    slow_simulator.set_faults(slow_tokenize=10)
    body = json.dumps({"model": "sim", "prompt": "one two three four", "max_tokens": 50}).encode()
    rid = give_up(slow_gateway, COMPLETIONS, body)
    left = slow_gateway.now()
    # GATEWAY_PROMPT_COUNT_TIMEOUT is 0.5 s: the line comes long before tokenize's ten seconds.
    counts = tokens_of(slow_gateway, rid, timeout=5)
    assert slow_gateway.now() - left < 5
    assert counts == (math.ceil(len(body) / 4), None, "estimate")


def test_a_responses_request_given_up_on_counts_an_estimated_prompt(slow_gateway):
    # vLLM's /tokenize does not take a Responses input: the prompt is estimated at once.
    body = json.dumps({"model": "sim", "input": "one two three", "max_output_tokens": 50}).encode()
    rid = give_up(slow_gateway, RESPONSES, body)
    assert tokens_of(slow_gateway, rid) == (math.ceil(len(body) / 4), None, "estimate")


def test_a_prompt_being_counted_when_the_gateway_stops_reaches_the_ledger(tmp_path, slow_simulator):
    slow_simulator.set_faults(slow_tokenize=1.0)
    with Gateway.start(tmp_path, [Backend("sim", slow_simulator.base_url)], env=FLUSH) as gateway:
        prompt = " ".join(["lorem"] * 25)
        body = json.dumps({"model": "sim", "messages": [{"role": "user", "content": prompt}], "max_tokens": 50})
        give_up_on_process(gateway, CHAT, body.encode())
        gateway.stop()  # SIGTERM while the backend's /tokenize takes its second
        rows = json.loads(gateway.cli("usage", "--by", "key,model", "--json").stdout)
    assert [(row["requests"], row["aborted"], row["prompt_tokens"]) for row in rows] == [(1, 1, 25)]


# ---- the token limit binds, however the request is spelt ------------------------------------------

PROMPT_265 = " ".join(["lorem"] * 265)
SHAPES = {
    "stream-1": (CHAT, {"messages": [{"role": "user", "content": PROMPT_265}], "max_tokens": 40, "stream": 1}),
    "escaped-stream-options": (
        CHAT,
        b'{"model":"sim","messages":[{"role":"user","content":"' + PROMPT_265.encode() + b'"}],"max_tokens":40,'
        b'"stream":true,"stream\\u005foptions":{"include_usage":false}}',
    ),
    "responses": (RESPONSES, {"input": PROMPT_265, "max_output_tokens": 40}),
    "responses-stream": (RESPONSES, {"input": PROMPT_265, "max_output_tokens": 40, "stream": True}),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_token_limit_binds_however_the_request_is_spelt(memory_gateway, shape):
    # 305 tokens a request: 1000 tokens admit four (the fourth with 85 left), and refuse the rest.
    key = limited_key(memory_gateway, "1000/minute")
    path, body = SHAPES[shape]
    content = body if isinstance(body, bytes) else {"model": "sim", **body}
    statuses = [post(memory_gateway, path, content, request_id(shape), key).status for _ in range(10)]
    assert statuses == [200] * 4 + [429] * 6


def test_the_openai_sdk_sees_a_cut_stream_fail_and_its_tokens_count(gateway, simulator):
    simulator.set_faults(crash_after_tokens=4)
    rid = request_id("sdk-cut")
    stream = gateway.openai().chat.completions.create(
        model="sim", messages=MESSAGES, max_tokens=50, stream=True, extra_headers={"X-Request-ID": rid}
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    line = wait_until(lambda: log_line(gateway.log_path, rid), timeout=10)
    assert counts_in(line) == (3, 4, "tokenize")
