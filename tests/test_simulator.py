"""The vLLM simulator, run as a real process and spoken to over HTTP like a vLLM server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.chat import chat_body
from tests.support.clients import client_tls, sdk
from tests.support.processes import REPO_ROOT, Simulator, http_status, parse_metrics, wait_until

CHAT = "/v1/chat/completions"


SIMULATOR_ARGS = ("--max-model-len", "512")


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """One simulator for the tests that leave it as they found it: each starts with no faults and
    empty stats (conftest's _fresh_simulator_state)."""
    with Simulator.start(tmp_path_factory.mktemp("simulator"), *SIMULATOR_ARGS) as simulator:
        yield simulator


@pytest.fixture
def fresh_simulator(tmp_path: Path) -> Iterator[Simulator]:
    """A simulator of the test's own: for counters that only grow (/metrics), or a fault that ends it."""
    with Simulator.start(tmp_path, *SIMULATOR_ARGS) as simulator:
        yield simulator


def client_for(simulator: Simulator, api_key: str = "unused") -> openai.OpenAI:
    return sdk(simulator.base_url + "/v1", api_key)


def four_token_chat(model: str, max_tokens: int, stream: bool = False, **extra: object) -> dict:
    """A chat whose prompt is four words: four tokens to the simulator."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "four words of prompt"}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }


def sse_events(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_chat_stream_sends_one_token_per_chunk_then_usage_and_done(simulator: Simulator) -> None:
    chunks = list(
        client_for(simulator).chat.completions.create(
            model=simulator.model,
            messages=[{"role": "user", "content": "four words of prompt"}],
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert chunks[0].choices[0].delta.role == "assistant"
    token_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(token_chunks) == 7
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens, chunks[-1].usage.total_tokens) == (
        4,
        7,
        11,
    )


def test_stream_ends_with_done_marker(simulator: Simulator) -> None:
    with httpx.stream("POST", simulator.base_url + CHAT, json=four_token_chat(simulator.model, 3, stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert len(events) == 1 + 3 + 1  # role chunk, tokens, [DONE]; no usage chunk unless asked


def test_non_stream_chat_and_completion_carry_usage_and_count_in_metrics(fresh_simulator: Simulator) -> None:
    client = client_for(fresh_simulator)
    chat = client.chat.completions.create(
        model=fresh_simulator.model, messages=[{"role": "user", "content": "one two three"}], max_tokens=5
    )
    text = client.completions.create(model=fresh_simulator.model, prompt="a b", max_tokens=9)

    assert chat.object == "chat.completion"
    assert len(chat.choices[0].message.content.split()) == 5
    assert chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 5)
    assert len(text.choices[0].text.split()) == 9
    assert (text.usage.prompt_tokens, text.usage.completion_tokens, text.usage.total_tokens) == (2, 9, 11)
    metrics = fresh_simulator.metrics()
    assert metrics["vllm:prompt_tokens_total"] == 5
    assert metrics["vllm:generation_tokens_total"] == 14


def test_models_lists_every_served_name_as_the_simulator(tmp_path: Path) -> None:
    with Simulator.start(
        tmp_path, "--served-model-name", "main", "alias", "--model", "models/main", "--max-model-len", "1024"
    ) as simulator:
        response = httpx.get(simulator.base_url + "/v1/models")
        chat = client_for(simulator).chat.completions.create(**chat_body("alias", max_tokens=1))

    assert response.headers["x-vllm-simulator"] == "1"
    cards = response.json()["data"]
    assert [card["id"] for card in cards] == ["main", "alias"]
    assert {(c["object"], c["owned_by"], c["root"], c["max_model_len"]) for c in cards} == {
        ("model", "vllm-simulator", "models/main", 1024)
    }
    assert chat.model == "alias"


def test_embeddings_are_deterministic_vectors_per_input(simulator: Simulator) -> None:
    client = client_for(simulator)
    first = client.embeddings.create(model=simulator.model, input=["same text", "other text"])
    again = client.embeddings.create(model=simulator.model, input="same text")
    as_floats = httpx.post(
        simulator.base_url + "/v1/embeddings", json={"model": simulator.model, "input": "same text"}
    ).json()

    vectors = [item.embedding for item in first.data]
    assert len(vectors) == 2 and len(vectors[0]) == 16
    assert vectors[0] != vectors[1]
    assert again.data[0].embedding == pytest.approx(vectors[0], rel=1e-6)
    assert as_floats["data"][0]["embedding"] == pytest.approx(vectors[0], rel=1e-6)
    assert first.usage.prompt_tokens == 4


def test_unknown_model_is_a_404_not_found_error(simulator: Simulator) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client_for(simulator).chat.completions.create(**chat_body("nope"))
    assert caught.value.body == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_bad_json_is_a_400_bad_request_error(simulator: Simulator) -> None:
    response = httpx.post(simulator.base_url + CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "BadRequestError"
    assert response.json()["error"]["code"] == 400


def test_prompt_plus_max_tokens_beyond_max_model_len_is_rejected(simulator: Simulator) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client_for(simulator).completions.create(model=simulator.model, prompt="a b c", max_tokens=510)


def test_requests_beyond_max_num_seqs_wait_in_the_queue(tmp_path: Path) -> None:
    async def scenario(simulator: Simulator) -> tuple[dict, dict, dict]:
        async with httpx.AsyncClient(base_url=simulator.base_url, timeout=60) as client:

            async def stream_forever() -> None:
                body = four_token_chat(simulator.model, 400, stream=True)
                async with client.stream("POST", CHAT, json=body) as response:
                    async for _ in response.aiter_bytes():
                        pass

            async def metrics() -> dict:
                return parse_metrics((await client.get("/metrics")).text)

            async def metrics_when(predicate) -> dict:
                for _ in range(400):
                    current = await metrics()
                    if predicate(current):
                        return current
                    await asyncio.sleep(0.05)
                return current

            tasks = [asyncio.create_task(stream_forever()) for _ in range(5)]
            busy = await metrics_when(lambda m: m["vllm:num_requests_waiting"] == 3)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            idle = await metrics_when(
                lambda m: m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
            )
            return busy, idle, (await client.get("/_simulator/stats")).json()

    with Simulator.start(tmp_path, "--max-num-seqs", "2", "--token-rate", "20") as simulator:
        busy, idle, stats = asyncio.run(scenario(simulator))

    assert (busy["vllm:num_requests_running"], busy["vllm:num_requests_waiting"]) == (2, 3)
    assert (idle["vllm:num_requests_running"], idle["vllm:num_requests_waiting"]) == (0, 0)
    assert stats["aborted"] == 5


def test_stats_keep_the_most_requests_that_ran_at_once_until_reset(tmp_path: Path) -> None:
    async def scenario(simulator: Simulator) -> tuple[dict, dict]:
        async with httpx.AsyncClient(base_url=simulator.base_url, timeout=60) as client:

            async def stream() -> None:
                body = four_token_chat(simulator.model, 20, stream=True)
                async with client.stream("POST", CHAT, json=body) as response:
                    async for _ in response.aiter_bytes():
                        pass

            await asyncio.gather(*(stream() for _ in range(3)))
            done = (await client.get("/_simulator/stats")).json()
            await client.delete("/_simulator/stats")
            return done, (await client.get("/_simulator/stats")).json()

    with Simulator.start(tmp_path, "--max-num-seqs", "2", "--token-rate", "50") as simulator:
        done, after_reset = asyncio.run(scenario(simulator))

    assert (done["running"], done["peak_running"]) == (0, 2)
    assert after_reset["peak_running"] == 0


def test_client_disconnect_aborts_the_request_at_once(tmp_path: Path) -> None:
    with Simulator.start(tmp_path, "--token-rate", "20") as simulator:
        with httpx.stream(
            "POST", simulator.base_url + CHAT, json=four_token_chat(simulator.model, 1000, stream=True)
        ) as response:
            lines = response.iter_lines()
            next(lines), next(lines)
            assert simulator.metrics()["vllm:num_requests_running"] == 1
        wait_until(lambda: simulator.metrics()["vllm:num_requests_running"] == 0)
        stats = simulator.stats()
        generated = simulator.metrics()["vllm:generation_tokens_total"]

    assert stats["aborted"] == 1 and stats["completed"] == 0
    assert generated < 1000


def test_error_status_fault_fails_generation_until_cleared(simulator: Simulator) -> None:
    client = client_for(simulator)
    assert simulator.set_faults(error_status=500) == {"error_status": 500}
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(**chat_body(simulator.model))
    assert caught.value.body["type"] == "InternalServerError"
    assert httpx.get(simulator.base_url + "/v1/models").status_code == 200

    simulator.clear_faults()
    assert httpx.get(simulator.base_url + "/_simulator/faults").json() == {}
    assert client.completions.create(model=simulator.model, prompt="x", max_tokens=2).usage


@pytest.mark.parametrize(
    "shape, content_type, expected",
    [
        ("detail", "application/json", {"detail": "Simulated engine failure (injected fault)."}),
        ("object", "application/json", {"object": "error", "code": 502}),
        ("text", "text/plain", "Simulated engine failure (injected fault)."),
        ("html", "text/html", "<title>502 BadGatewayError</title>"),
    ],
)
def test_error_shape_fault_answers_the_injected_error_in_that_shape(
    simulator: Simulator, shape: str, content_type: str, expected: object
) -> None:
    assert simulator.set_faults(error_status=502, error_shape=shape) == {"error_status": 502, "error_shape": shape}
    response = httpx.post(simulator.base_url + CHAT, json=four_token_chat(simulator.model, 2))
    assert response.status_code == 502
    assert response.headers["content-type"].startswith(content_type)
    if isinstance(expected, dict):
        assert expected.items() <= response.json().items()
    else:
        assert str(expected) in response.text
    bad = httpx.post(simulator.base_url + "/_simulator/faults", json={"error_status": 502, "error_shape": "xml"})
    assert bad.status_code == 400 and "error_shape" in bad.text


def test_health_status_fault_changes_health_only(simulator: Simulator) -> None:
    simulator.set_faults(health_status=503)
    assert http_status(simulator.base_url + "/health") == 503
    assert http_status(simulator.base_url + "/v1/models") == 200
    simulator.clear_faults()
    assert http_status(simulator.base_url + "/health") == 200


def test_slow_health_fault_holds_back_health_only(simulator: Simulator) -> None:
    simulator.set_faults(slow_health=30)
    assert http_status(simulator.base_url + "/health", timeout=0.5) is None  # no answer in time
    assert http_status(simulator.base_url + "/v1/models") == 200
    simulator.clear_faults()
    assert http_status(simulator.base_url + "/health") == 200


def test_slow_start_fault_holds_back_the_first_token(fresh_simulator: Simulator) -> None:
    fresh_simulator.set_faults(slow_start=60)
    with httpx.stream(
        "POST", fresh_simulator.base_url + CHAT, json=four_token_chat(fresh_simulator.model, 5, stream=True)
    ) as r:
        lines = r.iter_lines()  # kept: a dropped line iterator closes the response
        role_chunk = next(lines)
        metrics = fresh_simulator.metrics()
    assert '"role":"assistant"' in role_chunk
    assert metrics["vllm:num_requests_running"] == 1
    assert metrics["vllm:generation_tokens_total"] == 0


def stream_until_cut_off(simulator: Simulator, max_tokens: int) -> list[str]:
    """The lines of a streamed chat that must end in a transport error, not a clean end."""
    received: list[str] = []
    body = four_token_chat(simulator.model, max_tokens, stream=True)
    with pytest.raises(httpx.TransportError), httpx.stream("POST", simulator.base_url + CHAT, json=body) as response:
        for line in response.iter_lines():
            received.append(line)
    return received


def test_crash_fault_sends_some_tokens_then_drops_the_connection(simulator: Simulator) -> None:
    simulator.set_faults(crash_after_tokens=3)
    events = sse_events(stream_until_cut_off(simulator, 10))
    assert len(events) == 1 + 3 and "[DONE]" not in events
    assert all(json.loads(event)["choices"][0]["finish_reason"] is None for event in events)

    with pytest.raises(httpx.TransportError):  # non-streamed: no response at all
        httpx.post(simulator.base_url + CHAT, json=four_token_chat(simulator.model, 10))
    assert simulator.alive()
    assert simulator.stats()["crashed"] == 2


def test_exit_fault_ends_the_whole_process_mid_stream(fresh_simulator: Simulator) -> None:
    fresh_simulator.set_faults(exit_after_tokens=2)
    assert len(sse_events(stream_until_cut_off(fresh_simulator, 10))) == 1 + 2
    assert fresh_simulator.handle.popen.wait(timeout=10) == 1
    assert http_status(fresh_simulator.base_url + "/health") is None


@pytest.mark.parametrize(("body", "ends"), [({"code": 7}, 7), ({"signal": "SIGKILL"}, -9)])
def test_exit_asked_for_ends_the_process_with_that_code_or_signal(fresh_simulator: Simulator, body, ends) -> None:
    response = httpx.post(fresh_simulator.base_url + "/_simulator/exit", json=body)
    assert response.status_code == 202
    assert fresh_simulator.handle.popen.wait(timeout=10) == ends


@pytest.mark.parametrize(
    "body", [{}, {"code": 7, "signal": "SIGKILL"}, {"code": 256}, {"code": True}, {"signal": "SIGNOPE"}, {"why": 1}]
)
def test_a_malformed_exit_is_refused_and_the_simulator_lives_on(simulator: Simulator, body) -> None:
    response = httpx.post(simulator.base_url + "/_simulator/exit", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"]
    assert http_status(simulator.base_url + "/health") == 200


def test_exit_after_ends_the_process_with_the_exit_code_once_it_served(tmp_path: Path) -> None:
    with Simulator.start(tmp_path, "--exit-after", "0.5", "--exit-code", "3", wait=False) as simulator:
        assert simulator.handle.popen.wait(timeout=30) == 3
    log = (tmp_path / f"simulator-{simulator.port}.log").read_text()
    assert log.index("serving ['sim']") < log.index("exiting with code 3 after 0.5 s (--exit-after)")


def test_fault_defaults_come_from_the_command_line(tmp_path: Path) -> None:
    with Simulator.start(tmp_path, "--error-status", "503", "--health-status", "500") as simulator:
        faults = httpx.get(simulator.base_url + "/_simulator/faults").json()
        status = httpx.post(
            simulator.base_url + "/v1/completions", json={"model": simulator.model, "prompt": "x"}
        ).status_code
        health = http_status(simulator.base_url + "/health")
    assert faults == {"error_status": 503, "health_status": 500}
    assert (status, health) == (503, 500)


def test_responses_answer_whole_and_streamed_with_vllms_usage(simulator: Simulator) -> None:
    client = client_for(simulator)
    whole = client.responses.create(model=simulator.model, instructions="be brief", input="four words of prompt")
    events = list(
        client.responses.create(
            model=simulator.model,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "two words"}]}],
            max_output_tokens=3,
            stream=True,
        )
    )
    assert len(whole.output_text.split()) == 16  # the default max_output_tokens
    assert whole.usage is not None and (whole.usage.input_tokens, whole.usage.output_tokens) == (6, 16)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds.count("response.output_text.delta") == 3 and kinds[-1] == "response.completed"
    assert events[0].response.usage is None
    usage = events[-1].response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (2, 3, 5)
    assert events[-1].response.output_text == "lorem ipsum dolor"
    assert_bad_request(post_json(simulator, "/v1/responses", {"model": simulator.model, "input": 5}), "input")


def test_prompt_logprobs_follow_a_chats_usage_and_are_refused_for_streams(simulator: Simulator) -> None:
    body = four_token_chat(simulator.model, 2) | {"prompt_logprobs": 1}
    answer = post_json(simulator, CHAT, body)
    assert list(answer.json())[-2:] == ["usage", "prompt_logprobs"]  # vLLM's order
    logprobs = answer.json()["prompt_logprobs"]
    assert logprobs[0] is None and len(logprobs) == answer.json()["usage"]["prompt_tokens"] == 4
    assert [next(iter(entry.values()))["decoded_token"] for entry in logprobs[1:]] == ["words", "of", "prompt"]
    text = post_json(simulator, "/v1/completions", {"model": simulator.model, "prompt": "a b c", "prompt_logprobs": 0})
    assert len(text.json()["choices"][0]["prompt_logprobs"]) == 3
    assert_bad_request(post_json(simulator, CHAT, body | {"stream": True}), "prompt_logprobs")
    assert_bad_request(post_json(simulator, CHAT, body | {"prompt_logprobs": "all"}), "prompt_logprobs")


def read_pieces(url: str, body: dict) -> tuple[bytes, list[int]]:
    """The answer's body and the size of each read of it (each cut is followed by a pause)."""

    async def read() -> tuple[bytes, list[int]]:
        reads: list[int] = []
        data = b""
        async with httpx.AsyncClient(timeout=30) as client, client.stream("POST", url, json=body) as response:
            async for piece in response.aiter_raw():
                reads.append(len(piece))
                data += piece
        return data, reads

    return asyncio.run(read())


def test_body_faults_cut_an_answer_where_asked(simulator: Simulator) -> None:
    whole, _ = read_pieces(simulator.base_url + CHAT, four_token_chat(simulator.model, 3) | {"stream": False})
    simulator.set_faults(split_body_at=100, body_piece_bytes=150)
    cut, reads = read_pieces(simulator.base_url + CHAT, four_token_chat(simulator.model, 3) | {"stream": False})
    assert len(cut) == len(whole) and json.loads(cut)["usage"]["completion_tokens"] == 3
    # Every read ends at a cut (two pieces may still come in one read on a busy machine).
    ends = {sum(reads[: index + 1]) for index in range(len(reads))}
    assert len(reads) > 1 and ends <= {100, *range(150, len(cut), 150), len(cut)}
    streamed, stream_reads = read_pieces(simulator.base_url + CHAT, four_token_chat(simulator.model, 3, stream=True))
    assert streamed.endswith(b"data: [DONE]\n\n") and stream_reads[0] == 100
    assert_bad_request(post_json(simulator, "/_simulator/faults", {"body_piece_bytes": 0}), "body_piece_bytes")


def test_slow_tokenize_fault_holds_back_tokenize_only(simulator: Simulator) -> None:
    simulator.set_faults(slow_tokenize=60)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(simulator.base_url + "/tokenize", json={"model": simulator.model, "prompt": "a b"}, timeout=1)
    assert post_json(simulator, CHAT, four_token_chat(simulator.model, 1)).status_code == 200


def test_unknown_fault_is_rejected(simulator: Simulator) -> None:
    response = httpx.post(simulator.base_url + "/_simulator/faults", json={"explode": True})
    assert response.status_code == 400
    assert httpx.get(simulator.base_url + "/_simulator/faults").json() == {}


def test_api_key_is_required_under_v1_only(tmp_path: Path) -> None:
    with Simulator.start(tmp_path, "--api-key", "s3cret") as simulator:
        without = httpx.get(simulator.base_url + "/v1/models")
        wrong = httpx.get(simulator.base_url + "/v1/models", headers={"Authorization": "Bearer nope"})
        with pytest.raises(openai.AuthenticationError):
            client_for(simulator, "nope").models.list()
        models = client_for(simulator, "s3cret").models.list()
        health = http_status(simulator.base_url + "/health")

    assert (without.status_code, wrong.status_code) == (401, 401)
    assert [model.id for model in models] == [simulator.model]
    assert health == 200


def test_stats_show_what_the_last_api_request_carried(simulator: Simulator) -> None:
    body = four_token_chat(simulator.model, 2)
    response = httpx.post(
        simulator.base_url + CHAT, json=body, headers={"X-Request-ID": "req-42", "Authorization": "Bearer upstream"}
    )
    httpx.get(simulator.base_url + "/health")  # a health poll must not hide the API request
    stats = simulator.stats()

    assert response.json()["id"] == "chatcmpl-req-42"
    last = stats["last_request"]
    assert (last["method"], last["path"], last["body"]) == ("POST", CHAT, body)
    assert last["headers"]["x-request-id"] == "req-42"
    assert last["headers"]["authorization"] == "Bearer upstream"
    assert stats["requests"][CHAT] == 1 and stats["requests"]["/health"] == 1

    simulator.reset_stats()
    assert simulator.stats()["requests"] == {}


def test_tokenize_and_detokenize_round_trip_known_words(simulator: Simulator) -> None:
    tokens = httpx.post(
        simulator.base_url + "/tokenize", json={"model": simulator.model, "prompt": "lorem ipsum dolor"}
    ).json()
    text = httpx.post(
        simulator.base_url + "/detokenize", json={"model": simulator.model, "tokens": tokens["tokens"]}
    ).json()
    assert tokens["count"] == 3 and tokens["max_model_len"] == 512
    assert text == {"prompt": "lorem ipsum dolor"}


def test_transcription_returns_text_for_an_uploaded_file(simulator: Simulator) -> None:
    result = client_for(simulator).audio.transcriptions.create(
        model=simulator.model, file=("clip.wav", b"\0" * 5000, "audio/wav")
    )
    assert len(result.text.split()) == 5
    assert simulator.stats()["last_request"]["body"]["file"] == {"filename": "clip.wav", "size": 5000}


def test_version_and_metrics_name_the_model(simulator: Simulator) -> None:
    version = httpx.get(simulator.base_url + "/version").json()["version"]
    metrics_text = httpx.get(simulator.base_url + "/metrics").text
    assert version.endswith("+simulator")
    assert f'vllm:num_requests_running{{model_name="{simulator.model}"}} 0.0' in metrics_text


def test_startup_delay_keeps_the_port_closed_while_loading(tmp_path: Path) -> None:
    simulator = Simulator.start(tmp_path, "--startup-delay", "60", wait=False)
    try:
        wait_until(lambda: "pretending to load weights" in simulator.handle.log())
        assert simulator.alive()
        assert http_status(simulator.base_url + "/health") is None
    finally:
        simulator.stop()
    assert not simulator.handle.tree()


def test_vllm_flags_are_accepted_and_unknown_flags_rejected(tmp_path: Path) -> None:
    vllm_flags = [
        "--tensor-parallel-size",
        "4",
        "--gpu-memory-utilization",
        "0.3",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--max-parallel-loading-workers",
        "64",
        "--dtype",
        "float16",
    ]
    with Simulator.start(tmp_path, *vllm_flags) as simulator:
        card = httpx.get(simulator.base_url + "/v1/models").json()["data"][0]
    assert card["max_model_len"] == 2048

    rejected = subprocess.run(
        [sys.executable, "-m", "vllm_simulator", "--served-model-name", "x", "--bogus"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rejected.returncode == 2
    assert "--bogus" in rejected.stderr


# ---- Bad input is a 400 in vLLM's error shape, never a 500 --------------------------------------


def assert_bad_request(response: httpx.Response, param: str | None = None) -> dict:
    """The response is vLLM's 400 shape; `param`, when given, must be the field it names."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("BadRequestError", 400)
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def post_json(simulator: Simulator, path: str, body: object, client: httpx.Client | None = None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    url, headers = simulator.base_url + path, {"content-type": "application/json"}
    if client is not None:
        return client.post(url, content=raw, headers=headers, timeout=10)
    return httpx.post(url, content=raw, headers=headers, timeout=10, verify=client_tls())


def test_tokenize_with_messages_of_the_wrong_type_is_a_400(simulator: Simulator) -> None:
    for messages in (True, 5, "hi", {"role": "user"}, [], [["nested"]]):
        response = post_json(simulator, "/tokenize", {"model": simulator.model, "messages": messages})
        error = assert_bad_request(response)
        assert error["param"].startswith("messages"), error


def test_tokenize_with_a_prompt_that_is_not_a_string_is_a_400(simulator: Simulator) -> None:
    assert_bad_request(post_json(simulator, "/tokenize", {"model": simulator.model, "prompt": 5}), "prompt")
    assert_bad_request(post_json(simulator, "/tokenize", {"model": simulator.model}), "prompt")


def test_chat_message_whose_content_is_a_dict_or_a_number_is_a_400(simulator: Simulator) -> None:
    for content in ({"text": "hi"}, 5, True):
        body = {"model": simulator.model, "messages": [{"role": "user", "content": content}]}
        error = assert_bad_request(post_json(simulator, CHAT, body), "messages[0].content")
        assert "`messages[0].content`" in error["message"]


def test_chat_content_part_with_text_that_is_not_a_string_is_a_400(simulator: Simulator) -> None:
    parts = [{"type": "text", "text": "ok"}, {"type": "text", "text": {}}]
    body = {
        "model": simulator.model,
        "messages": [{"role": "user", "content": "fine"}, {"role": "user", "content": parts}],
    }
    assert_bad_request(post_json(simulator, CHAT, body), "messages[1].content[1].text")


def test_chat_message_that_is_not_an_object_or_has_no_role_is_a_400(simulator: Simulator) -> None:
    no_role = {"model": simulator.model, "messages": [{"content": "hi"}]}
    not_object = {"model": simulator.model, "messages": ["hi"]}
    assert_bad_request(post_json(simulator, CHAT, no_role), "messages[0].role")
    assert_bad_request(post_json(simulator, CHAT, not_object), "messages[0]")


def test_completion_prompt_that_is_a_number_null_or_nested_garbage_is_a_400(simulator: Simulator) -> None:
    for prompt in (5, None, [{"a": 1}], [True], [[1, "two"]], [[]], [-3]):
        body = {"model": simulator.model, "prompt": prompt}
        assert_bad_request(post_json(simulator, "/v1/completions", body), "prompt")


def test_max_tokens_that_is_a_string_a_float_or_negative_is_a_400(simulator: Simulator) -> None:
    for value in ("5", 2.5, -1, 0, True, 2**64):  # 2**64 no longer fits JSON's integers: a float
        body = four_token_chat(simulator.model, 1) | {"max_tokens": value}
        assert_bad_request(post_json(simulator, CHAT, body), "max_tokens")


def test_max_tokens_is_checked_even_when_max_completion_tokens_decides(simulator: Simulator) -> None:
    body = four_token_chat(simulator.model, 1) | {"max_tokens": "many", "max_completion_tokens": 2}
    assert_bad_request(post_json(simulator, CHAT, body), "max_tokens")


def test_huge_max_tokens_is_a_400_about_the_context_length(simulator: Simulator) -> None:
    body = {"model": simulator.model, "prompt": "x", "max_tokens": 2**64 - 1}
    error = assert_bad_request(post_json(simulator, "/v1/completions", body))
    assert "maximum context length is 512" in error["message"]


def test_model_that_is_not_a_string_is_a_400_not_a_404(simulator: Simulator) -> None:
    for model in (5, ["sim"], {"name": "sim"}, True):
        body = four_token_chat(simulator.model, 1) | {"model": model}
        assert_bad_request(post_json(simulator, CHAT, body), "model")


def test_booleans_are_read_as_vllms_pydantic_models_read_them(simulator: Simulator) -> None:
    # Lax mode: 0 and 1 (or 0.0 and 1.0), and true/false, yes/no, on/off, t/f, y/n, 1/0 in any case.
    for stream in (1, 1.0, "true", "Yes", "ON", "t", "1"):
        response = post_json(simulator, CHAT, four_token_chat(simulator.model, 1) | {"stream": stream})
        assert response.headers["content-type"].startswith("text/event-stream"), stream
    for stream in (0, 0.0, "false", "No", "off", "f", "0"):
        body = four_token_chat(simulator.model, 1) | {"stream": stream}
        assert post_json(simulator, CHAT, body).json()["usage"], stream
    asked = four_token_chat(simulator.model, 1, stream=True) | {"stream_options": {"include_usage": "yes"}}
    assert b'"choices":[],"usage"' in post_json(simulator, CHAT, asked).content


def test_a_boolean_spelt_in_no_way_vllm_reads_is_a_400_not_a_stream(simulator: Simulator) -> None:
    for stream in (2, 0.5, "", "maybe", " true", [True]):
        body = four_token_chat(simulator.model, 1) | {"stream": stream}
        assert_bad_request(post_json(simulator, CHAT, body), "stream")
    options = four_token_chat(simulator.model, 1, stream=True) | {"stream_options": {"include_usage": "sure"}}
    assert_bad_request(post_json(simulator, CHAT, options), "stream_options.include_usage")
    options = four_token_chat(simulator.model, 1, stream=True) | {"stream_options": {"continuous_usage_stats": 5}}
    assert_bad_request(post_json(simulator, CHAT, options), "stream_options.continuous_usage_stats")
    assert_bad_request(
        post_json(simulator, CHAT, four_token_chat(simulator.model, 1) | {"stream_options": [1]}), "stream_options"
    )


def test_embeddings_input_of_nested_garbage_or_unknown_encoding_is_a_400(simulator: Simulator) -> None:
    for value in (5, None, [], [{"a": 1}], [[{}]], [True]):
        body = {"model": simulator.model, "input": value}
        assert_bad_request(post_json(simulator, "/v1/embeddings", body), "input")
    body = {"model": simulator.model, "input": "x", "encoding_format": "int8"}
    assert_bad_request(post_json(simulator, "/v1/embeddings", body), "encoding_format")


def test_detokenize_with_booleans_or_negative_ids_is_a_400(simulator: Simulator) -> None:
    for tokens in ([True], [-1], [1, "2"], None, {"0": 1}):
        body = {"model": simulator.model, "tokens": tokens}
        assert_bad_request(post_json(simulator, "/detokenize", body), "tokens")


def test_transcription_with_the_model_sent_as_a_file_is_a_400(simulator: Simulator) -> None:
    response = httpx.post(
        simulator.base_url + "/v1/audio/transcriptions",
        files={"model": ("m.txt", simulator.model.encode()), "file": ("clip.wav", b"\0" * 1000, "audio/wav")},
    )
    assert_bad_request(response, "model")


def form_part(boundary: str, name: str, value: bytes, filename: str | None = None) -> bytes:
    extra = f'; filename="{filename}"' if filename else ""
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'
    return head.encode() + value + b"\r\n"


def test_broken_multipart_transcription_is_a_400(simulator: Simulator) -> None:
    boundary = "b0undary"
    audio = form_part(boundary, "file", b"\0" * 100, "clip.wav")
    end = f"--{boundary}--\r\n".encode()
    bodies = {
        "no boundary": ("multipart/form-data", audio + end),
        "no closing boundary": (None, audio[:-10]),
        "model not UTF-8": (None, form_part(boundary, "model", b"\xff\xfe") + audio + end),
        "response_format as a file": (None, form_part(boundary, "response_format", b"text", "f.txt") + audio + end),
        "no file": (None, form_part(boundary, "model", simulator.model.encode()) + end),
        # aiohttp's reader raises BadHttpMessage here, which is no ValueError.
        "too many part headers": (
            None,
            f"--{boundary}\r\n".encode() + b"X-A: b\r\n" * 200 + b"\r\nv\r\n" + audio + end,
        ),
        "part header without a colon": (None, f"--{boundary}\r\nno colon\r\n\r\nv\r\n".encode() + audio + end),
    }
    for label, (content_type, body) in bodies.items():
        response = httpx.post(
            simulator.base_url + "/v1/audio/transcriptions",
            content=body,
            headers={"content-type": content_type or f"multipart/form-data; boundary={boundary}"},
        )
        assert response.status_code == 400, (label, response.text)
        assert_bad_request(response)


def test_body_over_the_size_limit_is_a_413_in_the_openai_error_shape(simulator: Simulator) -> None:
    response = httpx.post(
        simulator.base_url + "/v1/completions",
        content=b" " * (65 * 2**20),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (413, "RequestEntityTooLargeError")


def test_malformed_body_is_a_400_even_while_an_error_fault_is_set(simulator: Simulator) -> None:
    simulator.set_faults(error_status=503)
    malformed = post_json(simulator, CHAT, {"model": simulator.model, "messages": True})
    well_formed = post_json(simulator, CHAT, four_token_chat(simulator.model, 1))
    assert_bad_request(malformed, "messages")
    assert well_formed.status_code == 503


def test_faults_with_a_status_that_cannot_end_a_response_or_fractional_tokens_are_a_400(simulator: Simulator) -> None:
    for faults in (
        {"error_status": 101},
        {"error_status": 200},
        {"health_status": 100},
        {"crash_after_tokens": 2.5},
        {"exit_after_tokens": 1e300},
        {"error_status": "500"},
        {"slow_start": -1},
    ):
        name = next(iter(faults))
        assert_bad_request(post_json(simulator, "/_simulator/faults", faults), name)
    assert httpx.get(simulator.base_url + "/_simulator/faults").json() == {}


def test_stats_still_answer_after_a_body_nested_too_deeply_to_encode_again(simulator: Simulator) -> None:
    deep = b'{"model": "sim", "tokens": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert_bad_request(post_json(simulator, "/detokenize", deep), "tokens")
    stats = httpx.get(simulator.base_url + "/_simulator/stats")
    assert stats.status_code == 200
    assert stats.json()["last_request"]["body"].startswith("<not recorded")


def test_every_input_shape_openai_allows_is_still_accepted(simulator: Simulator) -> None:
    """The checks above must not turn away what the OpenAI API and vLLM take."""
    parts = {
        "model": simulator.model,
        "messages": [
            {"role": "system", "content": None},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "two words"},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                ],
            },
            {"role": "assistant", "content": "", "tool_calls": []},
        ],
        "max_tokens": 1,
    }
    token_prompts = {"model": simulator.model, "prompt": [[1, 2, 3], [4]], "max_tokens": 1}
    id_prompt = {"model": simulator.model, "prompt": [5, 6], "max_tokens": 1}
    string_prompts = {"model": simulator.model, "prompt": ["a b", "c"], "max_tokens": 1}
    embed_ids = {"model": simulator.model, "input": [[1, 2], [3]], "encoding_format": "float"}
    tokenize_chat = {"model": simulator.model, "messages": [{"role": "user", "content": "lorem ipsum"}]}

    assert post_json(simulator, CHAT, parts).json()["usage"]["prompt_tokens"] == 2
    assert post_json(simulator, "/v1/completions", token_prompts).json()["usage"]["prompt_tokens"] == 4
    assert post_json(simulator, "/v1/completions", id_prompt).json()["usage"]["prompt_tokens"] == 2
    assert post_json(simulator, "/v1/completions", string_prompts).json()["usage"]["prompt_tokens"] == 3
    assert len(post_json(simulator, "/v1/embeddings", embed_ids).json()["data"]) == 2
    assert post_json(simulator, "/tokenize", tokenize_chat).json()["count"] == 2


# Every endpoint that reads a body gets each of these in place of the whole body, and each wrong
# value in place of each field it reads; all must be a 400 in vLLM's shape.
NOT_AN_OBJECT = [
    b"null",
    b"true",
    b"0",
    b"-1.5",
    b'"text"',
    b"[]",
    b'[{"model": "sim"}]',
    b"[[[]]]",
    b"[" * 1000 + b"]" * 1000,
    b"",
    b"{",
    b'{"model": "sim"',
]
WRONG_VALUES: list[object] = [True, -1, 2.5, "text", [], [None], [[{}]], {}, {"nested": {"deeper": [1, "x", None]}}]
DEEP_VALUE = b"[" * 1000 + b"]" * 1000
# Objects are right for stream_options: like vLLM, the simulator ignores options it does not know.
OBJECTS = [value for value in WRONG_VALUES if isinstance(value, dict)]

# (name, path, a body the endpoint accepts, {field: wrong values that are right for that field}).
# A field is a path of keys and list indexes into the body.
FieldPath = tuple[str | int, ...]
BODY_ENDPOINTS: list[tuple[str, str, dict, dict[FieldPath, list[object]]]] = [
    (
        "chat",
        CHAT,
        {
            "model": "sim",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
            "max_completion_tokens": 1,
            "stream": False,
            "stream_options": {"include_usage": False},
        },
        {
            ("model",): ["text"],
            ("messages",): [],
            ("messages", 0): [],
            ("messages", 0, "role"): ["text"],
            ("messages", 0, "content"): ["text", []],
            ("max_tokens",): [],
            ("max_completion_tokens",): [],
            ("stream",): [True],
            ("stream_options",): OBJECTS,
            ("stream_options", "include_usage"): [True],
        },
    ),
    (
        "completions",
        "/v1/completions",
        {"model": "sim", "prompt": "hi", "max_tokens": 1, "stream": False, "stream_options": {"include_usage": False}},
        {
            ("model",): ["text"],
            ("prompt",): ["text"],
            ("max_tokens",): [],
            ("stream",): [True],
            ("stream_options",): OBJECTS,
            ("stream_options", "include_usage"): [True],
        },
    ),
    (
        "embeddings",
        "/v1/embeddings",
        {"model": "sim", "input": "hi", "encoding_format": "float"},
        {("model",): ["text"], ("input",): ["text"], ("encoding_format",): []},
    ),
    ("tokenize-prompt", "/tokenize", {"model": "sim", "prompt": "hi"}, {("model",): ["text"], ("prompt",): ["text"]}),
    (
        "tokenize-messages",
        "/tokenize",
        {"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
        {("model",): ["text"], ("messages",): [], ("messages", 0, "content"): ["text", []]},
    ),
    ("detokenize", "/detokenize", {"model": "sim", "tokens": [1, 2]}, {("model",): ["text"], ("tokens",): [[]]}),
    (
        "faults",
        "/_simulator/faults",
        {"error_status": None, "health_status": None},
        {
            ("error_status",): [],
            ("health_status",): [],
            ("slow_start",): [2.5],
            ("crash_after_tokens",): [],
            ("exit_after_tokens",): [],
        },
    ),
    # JSON is not how a transcription is sent, but a JSON body must still be a clean 400.
    ("transcriptions", "/v1/audio/transcriptions", {"model": "sim"}, {}),
]


def param_of(field: FieldPath) -> str:
    """The field as the simulator names it in `param`: messages[0].content."""
    text = ""
    for key in field:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text


def with_value(body: dict, field: FieldPath, value: object) -> dict:
    copy = json.loads(json.dumps(body))
    target = copy
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    return copy


def bad_body_cases() -> Iterator[object]:
    """One pytest.param(path, body, param) per bad body; param is the field it spoils, if one."""
    for name, path, body, right_values in BODY_ENDPOINTS:
        for index, raw in enumerate(NOT_AN_OBJECT):
            yield pytest.param(path, raw, None, id=f"{name}-whole-body-{index}")
        for field, right in right_values.items():
            param = param_of(field)
            for index, value in enumerate(v for v in WRONG_VALUES if v not in right):
                yield pytest.param(path, with_value(body, field, value), param, id=f"{name}-{param}-{index}")
            deep = json.dumps(with_value(body, field, "@DEEP@")).encode()
            yield pytest.param(path, deep.replace(b'"@DEEP@"', DEEP_VALUE), param, id=f"{name}-{param}-deep")


@pytest.fixture(scope="module")
def shared_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """One simulator for the hundreds of bad bodies; none of them may change its state."""
    with Simulator.start(tmp_path_factory.mktemp("bad-bodies")) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def http_client() -> Iterator[httpx.Client]:
    with httpx.Client() as client:  # one client: building one per request costs more than the call
        yield client


def test_the_bodies_the_bad_ones_are_made_from_are_accepted(shared_sim: Simulator, http_client: httpx.Client) -> None:
    """Each bad body differs from one of these in one place, so that one place is the fault."""
    for name, path, body, _ in BODY_ENDPOINTS:
        if name != "transcriptions":
            assert post_json(shared_sim, path, body, http_client).status_code == 200, name


@pytest.mark.parametrize(("path", "body", "param"), list(bad_body_cases()))
def test_wrong_typed_body_is_a_400_in_the_openai_error_shape(
    shared_sim: Simulator, http_client: httpx.Client, path: str, body: object, param: str | None
) -> None:
    error = assert_bad_request(post_json(shared_sim, path, body, http_client))
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    if path == "/_simulator/faults":
        assert http_client.get(shared_sim.base_url + path).json() == {}
