"""Streaming relay: bytes as they come, upstream closed when the client leaves, clean ends on failure.

The gateway runs in the test's process (tests/support/memory_gateway.py) in front of simulator processes;
what the openai SDK makes of the same failures is in test_gateway_openai_sdk.py.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, raw_post
from tests.support.memory_gateway import ASKING_A_PROCESS, MemoryGateway
from tests.support.processes import Simulator, wait_until
from vllm_gateway.registry import BackendState

STREAM = chat_body("sim", max_tokens=10, stream=True, stream_options={"include_usage": True})


@pytest.fixture(scope="module")
def slow_simulator(tmp_path_factory):
    """Five tokens a second: slow enough to watch a stream arrive and to leave in the middle of it."""
    with Simulator.start(tmp_path_factory.mktemp("slow"), "--token-rate", "5", model="slow") as simulator:
        yield simulator


@pytest.fixture(scope="module")
def slow_gateway(tmp_path_factory, slow_simulator):
    backends = [Backend("slow", slow_simulator.base_url)]
    with MemoryGateway.start(tmp_path_factory.mktemp("gw"), backends, env={"GATEWAY_READ_TIMEOUT": "2"}) as gateway:
        yield gateway


def without_timestamps(data: bytes) -> bytes:
    return re.sub(rb'"created":\s*\d+', b'"created":0', data)


def test_stream_bytes_are_exactly_the_backends(memory_gateway, simulator):
    with httpx.Client(base_url=simulator.base_url, timeout=30) as client:
        direct = client.post("/v1/chat/completions", json=STREAM, headers={"X-Request-ID": "same-id"})
    relayed = memory_gateway.exchange(raw_post(memory_gateway.key, STREAM, extra="X-Request-ID: same-id\r\n"))
    assert relayed.header("content-type").startswith("text/event-stream")
    assert without_timestamps(relayed.body) == without_timestamps(direct.content)
    assert relayed.body.endswith(b"data: [DONE]\n\n")


def test_tokens_reach_the_client_while_the_backend_is_still_generating(slow_gateway):
    connection = slow_gateway.connect()
    connection.send(raw_post(slow_gateway.key, {**STREAM, "model": "slow"}))
    arrivals: list[float] = []
    received = bytearray()

    def ended() -> bool:
        data = connection.take()
        arrivals.extend([slow_gateway.now()] * data.count(b"data: {"))
        received.extend(data)
        return b"data: [DONE]" in received

    slow_gateway.until(ended, timeout=30)
    # Ten tokens at five a second: a buffering relay would deliver them all at once at the end.
    assert len(arrivals) >= 10
    assert arrivals[-1] - arrivals[0] > 1.0


def test_client_disconnect_aborts_the_generation_upstream(slow_gateway, slow_simulator):
    connection = slow_gateway.connect()
    connection.send(raw_post(slow_gateway.key, {**STREAM, "model": "slow", "max_tokens": 200}))
    slow_gateway.read_until(connection, b"data: {")
    assert slow_simulator.running() == 1
    connection.disconnect()
    slow_gateway.until(lambda: slow_simulator.running() == 0, timeout=10, interval=ASKING_A_PROCESS)
    assert slow_simulator.stats()["aborted"] >= 1


def test_client_leaving_a_non_streamed_request_aborts_it_upstream(slow_gateway, slow_simulator):
    aborted_before = slow_simulator.stats()["aborted"]
    connection = slow_gateway.connect()
    body = {"model": "slow", "prompt": "x", "max_tokens": 50}
    connection.send(raw_post(slow_gateway.key, body, path="/v1/completions"))
    slow_gateway.run(1.0)  # the client's patience: fifty tokens take ten seconds
    assert connection.take() == b""
    connection.disconnect()
    slow_gateway.until(
        lambda: slow_simulator.stats()["aborted"] == aborted_before + 1, timeout=10, interval=ASKING_A_PROCESS
    )
    assert slow_simulator.running() == 0


def test_backend_crash_mid_stream_ends_with_an_error_event(memory_gateway, simulator):
    simulator.set_faults(crash_after_tokens=3)
    response = memory_gateway.exchange(raw_post(memory_gateway.key, STREAM))
    events = [line for line in response.body.decode().split("\n\n") if line]
    assert response.status == 200
    assert sum('"content":"' in event and '"role"' not in event for event in events) == 3
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"


INJECTED = "Simulated engine failure (injected fault)."


@pytest.mark.parametrize(
    "shape, status, expected",
    [
        # uvicorn's answer for a route the server lacks
        ("detail", 404, {"message": INJECTED, "type": "invalid_request_error", "param": None, "code": "not_found"}),
        # the top-level shape of some vLLM versions: its fields are kept
        ("object", 400, {"message": INJECTED, "type": "BadRequestError", "param": None, "code": 400}),
        ("text", 500, {"message": INJECTED, "type": "server_error", "param": None, "code": "internal_server_error"}),
        # a proxy's page: its text, without the tags
        (
            "html",
            502,
            {
                "message": f"502 BadGatewayError 502 BadGatewayError {INJECTED}",
                "type": "server_error",
                "param": None,
                "code": "bad_gateway",
            },
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_error_in_another_shape_reaches_the_client_in_openais(
    memory_gateway, simulator, shape, status, expected, stream
):
    simulator.set_faults(error_status=status, error_shape=shape)
    response = memory_gateway.exchange(raw_post(memory_gateway.key, {**STREAM, "stream": stream}))
    assert response.status == status
    assert response.header("content-type") == "application/json"
    assert response.header("content-length") == str(len(response.body))
    assert json.loads(response.body) == {"error": expected}


def test_backend_silent_past_the_read_timeout_gives_504(slow_gateway, slow_simulator):
    slow_simulator.set_faults(slow_start=4)
    try:
        body = {"model": "slow", "prompt": "x", "max_tokens": 2}
        response = slow_gateway.exchange(raw_post(slow_gateway.key, body, path="/v1/completions"), timeout=10)
    finally:
        slow_simulator.clear_faults()
    assert response.status == 504
    assert json.loads(response.body)["error"]["code"] == "upstream_timeout"


def test_dead_backend_is_marked_down_and_requests_get_503_with_retry_after(tmp_path):
    with (
        Simulator.start(tmp_path) as simulator,
        MemoryGateway.start(tmp_path / "gw", [Backend("sim", simulator.base_url)]) as gateway,
    ):
        simulator.set_faults(exit_after_tokens=1)
        request = raw_post(gateway.key, {**STREAM, "stream": False})
        gateway.exchange(request)
        wait_until(lambda: not simulator.alive())
        model = gateway.state.registry.models["sim"]
        gateway.until(lambda: model.state is BackendState.DOWN, timeout=30, what="the model marked down")
        response = gateway.exchange(request)
    assert response.status == 503
    assert json.loads(response.body)["error"]["code"] == "model_not_ready"
    assert int(response.header("retry-after")) > 0


def test_a_client_reset_mid_completions_stream_leaves_nothing_running(slow_gateway, slow_simulator):
    body = b'{"model": "slow", "prompt": "x", "max_tokens": 100, "stream": true}'
    connection = slow_gateway.connect()
    connection.send(raw_post(slow_gateway.key, body, path="/v1/completions"))
    assert b"200 OK" in slow_gateway.read_until(connection, b"200 OK")
    connection.disconnect()
    slow_gateway.until(lambda: slow_simulator.running() == 0, timeout=10, interval=ASKING_A_PROCESS)
