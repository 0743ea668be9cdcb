"""The gateway in front of a real vLLM server (its CPU build, serving a tiny generated model)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.support.clients import client_tls, sdk
from tests.support.gateway import Backend, Gateway
from tests.support.processes import free_port, parse_metrics, wait_until_async
from tests.support.real_vllm import start_real_vllm, tiny_model_dir

# Real vLLM answers its health checks and metrics late when another test computes beside it.
pytestmark = pytest.mark.alone

MESSAGES = [{"role": "user", "content": "hello there"}]
# Liveness bounds. vLLM's API server, generating as fast as it can on a core it shares with the test (and,
# under coverage, a slower gateway), has taken 14 s to answer /metrics and 9 s to see a closed connection.
VLLM_ANSWERS_WITHIN = 30
VLLM_SETTLES_WITHIN = 90


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    server = start_real_vllm(free_port(), "tiny", tiny_model_dir(), tmp_path_factory.mktemp("vllm") / "vllm.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def real_gateway(tmp_path_factory, vllm):
    backend = Backend("tiny", vllm.base_url, path=tiny_model_dir(), aliases="tiny-chat")
    with Gateway.start(tmp_path_factory.mktemp("gw"), [backend], env={"GATEWAY_USAGE_FLUSH_SECONDS": "0.2"}) as gateway:
        yield gateway


def metrics_text(vllm) -> str:
    return httpx.get(vllm.base_url + "/metrics", timeout=VLLM_ANSWERS_WITHIN, verify=client_tls()).text


def metrics(vllm) -> dict[str, float]:
    return parse_metrics(metrics_text(vllm))


def test_model_list_shows_the_real_model_ready_with_its_path(real_gateway):
    model = real_gateway.openai().models.retrieve("tiny-chat")
    assert model.id == "tiny"
    assert model.model_extra["status"] == "ready"
    assert model.model_extra["path"] == tiny_model_dir()


def test_non_streamed_chat_usage_matches_a_direct_request(real_gateway, vllm):
    through = real_gateway.openai().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, extra_body={"ignore_eos": True}
    )
    direct = sdk(vllm.base_url + "/v1", "unused").chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=24, extra_body={"ignore_eos": True}
    )
    assert through.usage.completion_tokens == 24
    assert through.usage.prompt_tokens == direct.usage.prompt_tokens
    assert through.choices[0].finish_reason == "length"


def test_streamed_chat_delivers_the_tokens_and_usage_and_logs_them(real_gateway):
    chunks = list(
        real_gateway.openai().chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            extra_headers={"X-Request-ID": "real-stream-1"},
        )
    )
    usage = chunks[-1].usage
    assert usage.completion_tokens == 30
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None) >= 2
    line = next(row for row in real_gateway.log_text().splitlines() if "rid=real-stream-1 " in row)
    assert f"prompt_tokens={usage.prompt_tokens} completion_tokens=30" in line


def test_completions_and_tokenize_reach_vllm(real_gateway):
    client = real_gateway.openai()
    text = client.completions.create(model="tiny", prompt="the", max_tokens=5, extra_body={"ignore_eos": True})
    assert text.usage.completion_tokens == 5
    with real_gateway.http(real_gateway.key) as http:
        tokens = http.post("/tokenize", json={"model": "tiny", "prompt": "hello there"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0


def test_vllms_own_errors_are_relayed_to_the_sdk(real_gateway):
    with pytest.raises(openai.BadRequestError) as caught:
        real_gateway.openai().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100_000)
    assert caught.value.status_code == 400


def test_an_alias_vllm_was_not_started_with_reaches_it_under_the_models_own_name(real_gateway):
    # vLLM serves `tiny` only; the gateway's config adds the alias `tiny-chat`.
    reply = real_gateway.openai().chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 3
    assert reply.model == "tiny"


def test_an_endpoint_vllm_lacks_for_this_model_answers_an_openai_error(real_gateway):
    # vLLM registers /v1/embeddings only for embedding models: uvicorn answers {"detail": "Not Found"}.
    with pytest.raises(openai.NotFoundError) as caught:
        real_gateway.openai().embeddings.create(model="tiny", input="hello")
    assert caught.value.body == {
        "message": "Not Found",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }


def test_aborted_stream_leaves_no_request_running_in_vllm(real_gateway, vllm):
    # 60,000 tokens take vLLM minutes here and tens of seconds on a fast host. Its API server can hand out
    # the first events seconds after the engine made them, so a short generation could end before any
    # abort reached it (8,000 tokens did, once).
    max_tokens = 60_000
    before = metrics(vllm)["vllm:generation_tokens_total"]
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {real_gateway.key}"}
    with httpx.Client(timeout=60, headers=headers, verify=client_tls()) as client:
        with client.stream("POST", real_gateway.url + "/v1/chat/completions", json=body) as response:
            received = 0
            for line in response.iter_lines():
                received += line.startswith("data: {")
                if received == 5:
                    break
    deadline = time.monotonic() + VLLM_SETTLES_WITHIN
    while metrics(vllm)["vllm:num_requests_running"] != 0:
        assert time.monotonic() < deadline, "vLLM still runs the request the client abandoned"
        time.sleep(0.1)
    generated = metrics(vllm)["vllm:generation_tokens_total"] - before
    assert generated < max_tokens, f"vLLM generated all {generated} tokens: the abort never reached it"


def ledger_tokens(gateway) -> tuple[int, int, int]:
    with gateway.http(gateway.admin_key) as client:
        page = client.get("/admin/usage", params={"start_time": int(time.time()) - 86400, "bucket_width": "1d"}).json()
    results = [result for bucket in page["data"] for result in bucket["results"]]
    return (
        sum(r["num_model_requests"] for r in results),
        sum(r["input_tokens"] for r in results),
        sum(r["output_tokens"] for r in results),
    )


def settled_ledger_tokens(gateway) -> tuple[int, int, int]:
    """The ledger once earlier requests' batches are written: two reads a few batches apart agree."""
    last = ledger_tokens(gateway)
    while True:
        time.sleep(1)
        now = ledger_tokens(gateway)
        if now == last:
            return now
        last = now


def test_the_ledger_counts_what_vllm_counted_streamed_or_not(real_gateway, vllm):
    requests_before, prompt_before, completion_before = settled_ledger_tokens(real_gateway)
    before = metrics(vllm)
    client = real_gateway.openai()
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, extra_body={"ignore_eos": True})
    # A stream whose client did not ask for usage: the gateway asks vLLM, and the client sees no usage chunk.
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=9, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert all(chunk.choices for chunk in chunks) and all(chunk.usage is None for chunk in chunks)
    list(client.completions.create(model="tiny", prompt="the sea", max_tokens=7, stream=True))
    after = metrics(vllm)
    deadline = time.monotonic() + 10
    while ledger_tokens(real_gateway)[0] < requests_before + 3:
        assert time.monotonic() < deadline, "the ledger never counted the three requests"
        time.sleep(0.1)
    requests, prompt, completion = ledger_tokens(real_gateway)
    assert requests - requests_before == 3
    assert prompt - prompt_before == after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
    assert completion - completion_before == (
        after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    )


def queued_briefly(vllm) -> tuple[float, float]:
    """vLLM's own count of requests it has queued, in all and for under 0.3 s (its histogram's first
    bucket): a request it had to hold for want of a sequence waits as long as another one's answer."""
    text = metrics_text(vllm)
    # parse_metrics adds a name's series up over their labels: the one bucket is picked out by hand.
    briefly = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("vllm:request_queue_time_seconds_bucket{") and 'le="0.3"' in line
    )
    return parse_metrics(text)["vllm:request_queue_time_seconds_count"], briefly


def test_with_admission_vllm_never_queues_while_the_gateway_holds_the_excess(tmp_path, vllm):
    # vLLM runs with --max-num-seqs 8. Eight requests without end fill it; eight more then wait in the
    # gateway, and reach vLLM as the first eight end (their clients leave), each with a sequence free.
    # Let through, they would wait in vLLM's queue instead. Each step waits for the state it needs, so
    # the test holds however slowly a busy machine runs it.
    backend = Backend("tiny", vllm.base_url, path=tiny_model_dir(), max_num_seqs="8")
    count_before, briefly_before = queued_briefly(vllm)
    with Gateway.start(tmp_path, [backend]) as gateway:
        endless = {"model": "tiny", "messages": MESSAGES, "max_tokens": 60_000, "ignore_eos": True}
        short = endless | {"max_tokens": 20}

        async def run() -> list[str]:
            headers = {"Authorization": f"Bearer {gateway.key}"}
            http = httpx.AsyncClient(base_url=gateway.url, timeout=120, headers=headers, verify=client_tls())
            async with http as client:

                async def chat(body: dict[str, object]) -> str:
                    response = await client.post("/v1/chat/completions", json=body)
                    return str(response.json()["choices"][0]["finish_reason"])

                first = [asyncio.create_task(chat(endless)) for _ in range(8)]
                # The first eight went; then the gateway holds the next eight.
                await wait_until_async(lambda: gateway.health(gateway.admin_key)["in_flight"] == 8, VLLM_SETTLES_WITHIN)
                then = [asyncio.create_task(chat(short)) for _ in range(8)]
                await wait_until_async(lambda: gateway.waiting() == 8, VLLM_SETTLES_WITHIN)
                for request in first:
                    request.cancel()  # its client leaves: httpx closes the connection
                await asyncio.gather(*first, return_exceptions=True)
                return await asyncio.gather(*then)

        endings = asyncio.run(run())
        lines = [line for line in gateway.log_text().splitlines() if " access " in line and "/v1/chat" in line]
    count, briefly = queued_briefly(vllm)
    assert endings == ["length"] * 8
    # vLLM's queue times count finished requests (not those whose clients left): the second eight.
    assert count - count_before == 8, "vLLM did not finish the second eight"
    assert briefly - briefly_before == 8, "vLLM queued requests the gateway let through"
    assert sum("status=499" in line for line in lines) == 8, "the first eight did not end as their clients left"
    assert sum("queue_ms=" in line for line in lines) == 8, "the gateway did not hold exactly the excess"


def ledger_and_vllm_counts(gateway, vllm, requests: int, send) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """What `send()` added to the ledger (requests, input, output tokens) and to vLLM's own counters
    (prompt, generation tokens), once vLLM runs nothing and the ledger counts `requests` more."""
    before_ledger = settled_ledger_tokens(gateway)
    before = metrics(vllm)
    send()
    deadline = time.monotonic() + VLLM_SETTLES_WITHIN
    while metrics(vllm)["vllm:num_requests_running"] != 0 or ledger_tokens(gateway)[0] < before_ledger[0] + requests:
        assert time.monotonic() < deadline, "vLLM or the ledger never settled"
        time.sleep(0.1)
    after = metrics(vllm)
    after_ledger = settled_ledger_tokens(gateway)
    ledger = tuple(now - then for now, then in zip(after_ledger, before_ledger, strict=True))
    vllm_counts = tuple(
        int(after[name] - before[name]) for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    )
    return ledger, vllm_counts  # type: ignore[return-value]


def test_the_ledger_counts_streams_however_their_request_spells_stream_and_its_options(real_gateway, vllm):
    contents: list[bytes] = []

    def send() -> None:
        chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 9, "ignore_eos": True}
        escaped = (
            b'{"model":"tiny","messages":[{"role":"user","content":"hello there"}],"max_tokens":6,"ignore_eos":true,'
            b'"stream":"yes","stream\\u005foptions":{"include_usage":false}}'
        )
        with real_gateway.http(real_gateway.key, timeout=60) as client:
            contents.append(client.post("/v1/chat/completions", json=chat | {"stream": 1}).content)
            text = {"model": "tiny", "prompt": "the sea", "max_tokens": 7, "ignore_eos": True, "stream": "true"}
            contents.append(client.post("/v1/completions", json=text).content)
            headers = {"content-type": "application/json"}
            contents.append(client.post("/v1/chat/completions", content=escaped, headers=headers).content)

    ledger, vllm_counts = ledger_and_vllm_counts(real_gateway, vllm, 3, send)
    assert all(content.endswith(b"data: [DONE]\n\n") and b'"usage"' not in content for content in contents)
    assert vllm_counts[1] == 9 + 7 + 6
    assert ledger == (3, *vllm_counts)


def test_the_ledger_counts_responses_whole_and_streamed(real_gateway, vllm):
    def send() -> None:
        client = real_gateway.openai()
        client.responses.create(model="tiny", input="hello there", max_output_tokens=8, extra_body={"ignore_eos": True})
        events = list(
            client.responses.create(
                model="tiny", input="hello there", max_output_tokens=5, stream=True, extra_body={"ignore_eos": True}
            )
        )
        assert events[-1].type in ("response.completed", "response.incomplete")

    ledger, vllm_counts = ledger_and_vllm_counts(real_gateway, vllm, 2, send)
    assert ledger == (2, *vllm_counts)


def test_the_ledger_counts_a_chat_whose_usage_comes_before_a_long_prompts_logprobs(real_gateway, vllm):
    sizes: list[int] = []

    def send() -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hello there " * 700}],
            "max_tokens": 3,
            "ignore_eos": True,
            "prompt_logprobs": 1,
        }
        with real_gateway.http(real_gateway.key, timeout=120) as client:
            sizes.append(len(client.post("/v1/chat/completions", json=body).content))

    ledger, vllm_counts = ledger_and_vllm_counts(real_gateway, vllm, 1, send)
    assert sizes[0] > 500_000  # read in many pieces, the usage in the first
    assert vllm_counts[0] > 4000
    assert ledger == (1, *vllm_counts[:1], 3)


def test_a_request_given_up_on_counts_the_prompt_vllm_read(real_gateway, vllm):
    def send() -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hello there " * 700}],
            "max_tokens": 60_000,  # far more than any host makes in the 1.5 s the client waits
            "ignore_eos": True,
        }
        with real_gateway.http(real_gateway.key, timeout=1.5) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=body)

    ledger, (prompt, generated) = ledger_and_vllm_counts(real_gateway, vllm, 1, send)
    assert prompt > 4000 and 0 < generated < 60_000  # vLLM read the prompt and began the answer
    # The prompt as vLLM's /tokenize counts it, which is what its usage would have said; nothing was delivered.
    assert ledger == (1, prompt, 0)
