"""The simulator's sleep mode (vllm_simulator/sleep.py), run as a real process and spoken to as vLLM's
development routes are: POST /sleep, POST /wake_up, GET /is_sleeping (VLLM_SERVER_DEV_MODE=1)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.processes import Simulator, parse_metrics, wait_until

CHAT = "/v1/chat/completions"
# Quick operations: a sleep of 0.2 s, a full wake of 0.4 s (0.3 s the weights, 0.1 s the KV cache).
SLEEP_ARGS = ("--enable-sleep-mode", "--sleep-seconds", "0.2", "--wake-seconds", "0.4")


def start_dev_simulator(log_dir: Path, *args: str) -> Simulator:
    """A simulator started with VLLM_SERVER_DEV_MODE=1 in its environment, as vLLM needs for /sleep."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_SERVER_DEV_MODE", "1")
        return Simulator.start(log_dir, *args)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """One simulator for the tests that leave it awake."""
    with start_dev_simulator(tmp_path_factory.mktemp("sleep"), *SLEEP_ARGS) as simulator:
        yield simulator


@pytest.fixture
def dev_simulator(tmp_path: Path) -> Iterator[Simulator]:
    """A simulator of the test's own, for tests that leave requests or a sleep behind."""
    with start_dev_simulator(tmp_path, *SLEEP_ARGS) as simulator:
        yield simulator


def chat(model: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "four words of prompt"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def data_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def sleep_state(simulator: Simulator) -> dict[str, float]:
    """vllm:engine_sleep_state's series, by their sleep_state label."""
    text = httpx.get(simulator.base_url + "/metrics").text
    return {
        line.split('sleep_state="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:engine_sleep_state{")
    }


def test_sleep_routes_do_not_exist_without_dev_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    with Simulator.start(tmp_path, *SLEEP_ARGS) as simulator:
        answers = [
            httpx.post(simulator.base_url + "/sleep"),
            httpx.post(simulator.base_url + "/wake_up"),
            httpx.get(simulator.base_url + "/is_sleeping"),
        ]
        metrics = sleep_state(simulator)

    assert [(a.status_code, a.json()) for a in answers] == [(404, {"detail": "Not Found"})] * 3
    # vLLM's gauge is there with or without the routes.
    assert metrics == {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}


def test_is_sleeping_flips_and_health_stays_200_while_asleep(shared: Simulator) -> None:
    base = shared.base_url
    assert httpx.get(base + "/is_sleeping").json() == {"is_sleeping": False}

    slept = httpx.post(base + "/sleep", params={"level": "1"})
    asleep = httpx.get(base + "/is_sleeping").json()
    health = httpx.get(base + "/health").status_code
    state_asleep = sleep_state(shared)
    stats_asleep = shared.stats()["sleep"]
    woke = httpx.post(base + "/wake_up")
    awake = httpx.get(base + "/is_sleeping").json()

    assert (slept.status_code, slept.json()) == (200, {"status": "sleeping", "level": 1})
    assert asleep == {"is_sleeping": True}
    assert health == 200
    assert state_asleep == {"awake": 0.0, "weights_offloaded": 1.0, "discard_all": 0.0}
    assert stats_asleep["is_sleeping"] and stats_asleep["level"] == 1 and stats_asleep["sleeps"] == 1
    assert (woke.status_code, woke.json()) == (200, {"status": "awake", "tags": None})
    assert awake == {"is_sleeping": False}
    assert sleep_state(shared)["awake"] == 1.0
    assert shared.stats()["sleep"] == {
        "is_sleeping": False,
        "level": None,
        "sleeping_tags": [],
        "scheduler": "unpaused",
        "sleeps": 1,
        "wakes": 1,
    }


def test_a_second_sleep_answers_again_with_its_level(shared: Simulator) -> None:
    first = httpx.post(shared.base_url + "/sleep", params={"level": "1"}).json()
    second = httpx.post(shared.base_url + "/sleep", params={"level": "2"}).json()
    state = sleep_state(shared)
    httpx.post(shared.base_url + "/wake_up")

    assert (first, second) == ({"status": "sleeping", "level": 1}, {"status": "sleeping", "level": 2})
    assert state == {"awake": 0.0, "weights_offloaded": 0.0, "discard_all": 1.0}


def test_waking_an_awake_engine_answers_awake(shared: Simulator) -> None:
    answer = httpx.post(shared.base_url + "/wake_up", params={"tags": "weights"})
    assert (answer.status_code, answer.json()) == (200, {"status": "awake", "tags": ["weights"]})


@pytest.mark.parametrize(
    ("query", "param", "error"),
    [
        ({"level": "3"}, "query.level", "'type': 'less_than_equal'"),
        ({"level": "-1"}, "query.level", "'type': 'greater_than_equal'"),
        ({"level": "one"}, "query.level", "'type': 'int_parsing'"),
        ({"mode": "drain"}, "query.mode", "Input should be 'abort', 'wait' or 'keep'"),
    ],
)
def test_a_bad_level_or_mode_is_refused_with_400_as_vllm_refuses_it(
    shared: Simulator, query: dict[str, str], param: str, error: str
) -> None:
    answer = httpx.post(shared.base_url + "/sleep", params=query)

    # vLLM turns FastAPI's 422 into a 400 in its own error shape (validation_exception_handler).
    assert answer.status_code == 400
    body = answer.json()["error"]
    assert (body["type"], body["param"], body["code"]) == ("Bad Request", param, 400)
    assert body["message"].startswith("1 validation error:\n  {") and error in body["message"]
    assert httpx.get(shared.base_url + "/is_sleeping").json() == {"is_sleeping": False}


def test_a_chat_sent_while_asleep_waits_and_is_answered_only_after_wake_up(dev_simulator: Simulator) -> None:
    async def scenario() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=dev_simulator.base_url, timeout=30) as client:
            assert (await client.post("/sleep")).json() == {"status": "sleeping", "level": 1}
            request = asyncio.create_task(client.post(CHAT, json=chat(dev_simulator.model, 3)))
            for _ in range(200):
                if (await client.get("/_simulator/stats")).json()["waiting"] == 1:
                    break
                await asyncio.sleep(0.02)
            metrics = parse_metrics((await client.get("/metrics")).text)
            await asyncio.sleep(0.3)
            assert not request.done(), "answered while the engine slept"
            woke = (await client.post("/wake_up")).json()
            answer = await request
            return {"metrics": metrics, "woke": woke, "answer": answer}

    result = asyncio.run(scenario())

    assert result["metrics"]["vllm:num_requests_waiting"] == 1
    assert result["woke"] == {"status": "awake", "tags": None}
    assert result["answer"].status_code == 200
    assert result["answer"].json()["choices"][0]["finish_reason"] == "length"


def test_waking_only_the_weights_leaves_the_engine_asleep(dev_simulator: Simulator) -> None:
    async def scenario() -> list[Any]:
        async with httpx.AsyncClient(base_url=dev_simulator.base_url, timeout=30) as client:
            await client.post("/sleep")
            request = asyncio.create_task(client.post(CHAT, json=chat(dev_simulator.model, 3)))
            weights = (await client.post("/wake_up", params={"tags": "weights"})).json()
            unknown = (await client.post("/wake_up", params={"tags": "lora"})).json()
            still = (await client.get("/is_sleeping")).json()
            await asyncio.sleep(0.2)
            waited = not request.done()
            kv_cache = (await client.post("/wake_up", params={"tags": "kv_cache"})).json()
            answer = await request
            return [weights, unknown, still, waited, kv_cache, answer.status_code]

    weights, unknown, still, waited, kv_cache, status = asyncio.run(scenario())

    assert weights == {"status": "sleeping", "tags": ["weights"]}
    assert unknown == {"status": "sleeping", "tags": ["lora"]}  # vLLM leaves the engine as it was
    assert still == {"is_sleeping": True}
    assert waited, "answered before the KV cache was awake"
    assert kv_cache == {"status": "awake", "tags": ["kv_cache"]}
    assert status == 200


def test_a_tag_named_twice_wakes_it_then_fails_with_500_as_vllm_does(dev_simulator: Simulator) -> None:
    base = dev_simulator.base_url
    httpx.post(base + "/sleep")
    twice = httpx.post(base + "/wake_up", params=[("tags", "weights"), ("tags", "weights")])
    rest = httpx.post(base + "/wake_up", params={"tags": "kv_cache"}).json()

    assert twice.status_code == 500
    assert twice.json()["error"]["message"] == "Call to wake_up method failed: 'weights'"
    assert rest == {"status": "awake", "tags": ["kv_cache"]}


def test_sleep_with_mode_wait_answers_once_the_stream_in_flight_has_finished(dev_simulator: Simulator) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        order: list[str] = []
        async with httpx.AsyncClient(base_url=dev_simulator.base_url, timeout=30) as client:
            started = asyncio.Event()

            async def stream() -> str:
                text = ""
                async with client.stream("POST", CHAT, json=chat(dev_simulator.model, 1000, stream=True)) as r:
                    async for piece in r.aiter_text():
                        text += piece
                        started.set()
                order.append("stream done")
                return text

            streaming = asyncio.create_task(stream())
            await started.wait()  # a second of tokens still to come
            order.append("sleep sent")
            answer = (await client.post("/sleep", params={"level": "1", "mode": "wait"})).json()
            order.append("sleep answered")
            text = await streaming
            await client.post("/wake_up")
            assert answer == {"status": "sleeping", "level": 1}
            return order, data_events(text)

    order, events = asyncio.run(scenario())

    assert order == ["sleep sent", "stream done", "sleep answered"]
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e)["choices"]]
    assert finishes[-1] == "length" and "abort" not in finishes
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 1000
    assert events[-1] == "[DONE]"


def test_sleep_with_mode_abort_ends_requests_in_flight_with_finish_reason_abort(tmp_path: Path) -> None:
    async def scenario(simulator: Simulator) -> tuple[list[Any], Any, dict[str, Any]]:
        async with (
            openai.AsyncOpenAI(base_url=simulator.base_url + "/v1", api_key="unused", max_retries=0) as client,
            httpx.AsyncClient(base_url=simulator.base_url, timeout=30) as http,
        ):
            stream = await client.chat.completions.create(**chat(simulator.model, 4000, stream=True))
            chunks = [await stream.__anext__() for _ in range(5)]
            # With one slot taken, this one waits in the queue; the abort ends it too, before any token.
            queued = asyncio.create_task(client.chat.completions.create(**chat(simulator.model, 5)))
            wait_for = asyncio.get_running_loop().time() + 10
            while (await http.get("/_simulator/stats")).json()["waiting"] != 1:
                assert asyncio.get_running_loop().time() < wait_for
                await asyncio.sleep(0.02)
            assert (await http.post("/sleep", params={"mode": "abort"})).json() == {"status": "sleeping", "level": 1}
            chunks += [chunk async for chunk in stream]
            whole = await queued
            stats = (await http.get("/_simulator/stats")).json()
        return chunks, whole, stats

    with start_dev_simulator(tmp_path, *SLEEP_ARGS, "--max-num-seqs", "1", "--token-rate", "200") as simulator:
        chunks, whole, stats = asyncio.run(scenario(simulator))

    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["abort"]
    assert finishing[0].choices[0].delta.content == ""
    tokens = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(tokens) < 4000
    assert whole.choices[0].finish_reason == "abort"
    assert (whole.choices[0].message.content, whole.usage.completion_tokens) == ("", 0)
    assert (stats["aborted"], stats["completed"], stats["running"], stats["waiting"]) == (2, 0, 0, 0)


def test_sleep_with_mode_keep_freezes_a_stream_that_goes_on_after_wake_up(dev_simulator: Simulator) -> None:
    async def scenario() -> tuple[int, int, list[str]]:
        async with httpx.AsyncClient(base_url=dev_simulator.base_url, timeout=30) as client:
            received: list[str] = []

            async def stream() -> None:
                async with client.stream("POST", CHAT, json=chat(dev_simulator.model, 400, stream=True)) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            received.append(line.removeprefix("data: "))

            streaming = asyncio.create_task(stream())
            while len(received) < 10:
                await asyncio.sleep(0.005)
            await client.post("/sleep", params={"mode": "keep"})
            frozen_at = len(received)
            await asyncio.sleep(0.3)
            still_at = len(received)
            await client.post("/wake_up")
            await streaming
            return frozen_at, still_at, received

    frozen_at, still_at, events = asyncio.run(scenario())

    assert frozen_at == still_at < 400, "tokens came while the engine slept"
    assert events[-1] == "[DONE]"
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 400


def test_without_enable_sleep_mode_a_sleep_only_pauses_the_scheduler(tmp_path: Path) -> None:
    # vLLM without --enable-sleep-mode moves nothing off the device, so the long sleep and wake
    # flags must not apply; the 5 s client timeout would fail a 60 s sleep.
    with start_dev_simulator(tmp_path, "--sleep-seconds", "60", "--wake-seconds", "60") as simulator:
        slept = httpx.post(simulator.base_url + "/sleep", timeout=5).json()
        asleep = httpx.get(simulator.base_url + "/is_sleeping").json()
        woke = httpx.post(simulator.base_url + "/wake_up", timeout=5).json()
        wait_until(lambda: httpx.get(simulator.base_url + "/is_sleeping").json() == {"is_sleeping": False})

    assert slept == {"status": "sleeping", "level": 1}
    assert asleep == {"is_sleeping": True}
    assert woke == {"status": "awake", "tags": None}
