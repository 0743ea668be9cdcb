"""Streaming relay: bytes as they come, upstream closed when the client leaves, clean ends on failure."""

from __future__ import annotations

import re
import socket
import time

import httpx
import openai
import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway, raw_post
from tests.support.processes import Simulator

STREAM = chat_body("sim", max_tokens=10, stream=True, stream_options={"include_usage": True})


@pytest.fixture(scope="module")
def slow_simulator(tmp_path_factory):
    """Five tokens a second: slow enough to watch a stream arrive and to leave in the middle of it."""
    with Simulator.start(tmp_path_factory.mktemp("slow"), "--token-rate", "5", model="slow") as simulator:
        yield simulator


@pytest.fixture(scope="module")
def slow_gateway(tmp_path_factory, slow_simulator):
    backends = [Backend("slow", slow_simulator.base_url)]
    with Gateway.start(tmp_path_factory.mktemp("gw"), backends, env={"GATEWAY_READ_TIMEOUT": "2"}) as gateway:
        yield gateway


def without_timestamps(data: bytes) -> bytes:
    return re.sub(rb'"created":\s*\d+', b'"created":0', data)


def test_stream_bytes_are_exactly_the_backends(gateway, simulator):
    headers = {"X-Request-ID": "same-id"}
    with httpx.Client(timeout=30) as client:
        direct = client.post(simulator.base_url + "/v1/chat/completions", json=STREAM, headers=headers)
        relayed = client.post(
            gateway.url + "/v1/chat/completions",
            json=STREAM,
            headers={**headers, "Authorization": f"Bearer {gateway.key}"},
        )
    assert relayed.headers["content-type"].startswith("text/event-stream")
    assert without_timestamps(relayed.content) == without_timestamps(direct.content)
    assert relayed.content.endswith(b"data: [DONE]\n\n")


def test_tokens_reach_the_client_while_the_backend_is_still_generating(slow_gateway):
    arrivals = []
    body = {**STREAM, "model": "slow"}
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {slow_gateway.key}"}) as client:
        with client.stream("POST", slow_gateway.url + "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
    # Ten tokens at five a second: a buffering relay would deliver them all at once at the end.
    assert len(arrivals) >= 10
    assert arrivals[-1] - arrivals[0] > 1.0


def test_client_disconnect_aborts_the_generation_upstream(slow_gateway, slow_simulator):
    body = {**STREAM, "model": "slow", "max_tokens": 200}
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {slow_gateway.key}"}) as client:
        with client.stream("POST", slow_gateway.url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            assert slow_simulator.metrics()["vllm:num_requests_running"] == 1
    wait_for(lambda: slow_simulator.metrics()["vllm:num_requests_running"] == 0)
    assert slow_simulator.stats()["aborted"] >= 1


def test_client_leaving_a_non_streamed_request_aborts_it_upstream(slow_gateway, slow_simulator):
    aborted_before = slow_simulator.stats()["aborted"]
    body = {"model": "slow", "prompt": "x", "max_tokens": 50}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            slow_gateway.url + "/v1/completions",
            json=body,
            timeout=1.0,
            headers={"Authorization": f"Bearer {slow_gateway.key}"},
        )
    wait_for(lambda: slow_simulator.stats()["aborted"] == aborted_before + 1)
    assert slow_simulator.metrics()["vllm:num_requests_running"] == 0


def test_backend_crash_mid_stream_ends_with_an_error_event(gateway, simulator):
    simulator.set_faults(crash_after_tokens=3)
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {gateway.key}"}) as client:
        response = client.post(gateway.url + "/v1/chat/completions", json=STREAM)
    events = [line for line in response.text.split("\n\n") if line]
    assert response.status_code == 200
    assert sum('"content":"' in event and '"role"' not in event for event in events) == 3
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"


def test_backend_crash_mid_stream_raises_in_the_openai_sdk(gateway, simulator):
    simulator.set_faults(crash_after_tokens=2)
    stream = gateway.openai().chat.completions.create(**chat_body("sim", max_tokens=10, stream=True))
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert len(received) >= 2


def test_backend_error_status_is_relayed_as_is(gateway, simulator):
    simulator.set_faults(error_status=500)
    with pytest.raises(openai.InternalServerError) as caught:
        gateway.openai().chat.completions.create(**chat_body("sim"))
    assert caught.value.status_code == 500
    assert caught.value.body["type"] == "InternalServerError"


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
    gateway, simulator, shape, status, expected, stream
):
    simulator.set_faults(error_status=status, error_shape=shape)
    with gateway.http(gateway.key) as client:
        response = client.post("/v1/chat/completions", json={**STREAM, "stream": stream})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    assert response.json() == {"error": expected}


def test_the_openai_sdk_reads_the_message_of_a_rewrapped_error(gateway, simulator):
    simulator.set_faults(error_status=404, error_shape="detail")
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.openai().chat.completions.create(**chat_body("sim"))
    assert caught.value.body == {
        "message": INJECTED,
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }


def test_backend_silent_past_the_read_timeout_gives_504(slow_gateway, slow_simulator):
    slow_simulator.set_faults(slow_start=4)
    try:
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {slow_gateway.key}"}) as client:
            response = client.post(
                slow_gateway.url + "/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 2}
            )
    finally:
        slow_simulator.clear_faults()
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_dead_backend_is_marked_down_and_requests_get_503_with_retry_after(tmp_path):
    with (
        Simulator.start(tmp_path) as simulator,
        Gateway.start(tmp_path / "gw", [Backend("sim", simulator.base_url)]) as gateway,
    ):
        simulator.set_faults(exit_after_tokens=1)
        with gateway.http(gateway.key) as client:
            client.post("/v1/chat/completions", json={**STREAM, "stream": False})
            wait_for(lambda: not simulator.alive())
            gateway.wait_until(lambda health: health["models"][0]["status"] == "down")
            response = client.post("/v1/chat/completions", json={**STREAM, "stream": False})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_not_ready"
    assert int(response.headers["retry-after"]) > 0


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_raw_socket_disconnect_mid_stream_leaves_nothing_running(slow_gateway, slow_simulator):
    body = b'{"model": "slow", "prompt": "x", "max_tokens": 100, "stream": true}'
    request = raw_post(slow_gateway.key, body, path="/v1/completions")
    sock = socket.create_connection(("127.0.0.1", slow_gateway.port))
    sock.sendall(request)
    assert b"200 OK" in sock.recv(4096)
    sock.close()
    wait_for(lambda: slow_simulator.metrics()["vllm:num_requests_running"] == 0)
