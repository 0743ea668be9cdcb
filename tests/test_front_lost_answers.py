"""Answers the gateway owes and must not lose (spec: "No lost answers"): a complete request followed
by garbage, a client that half-closes after its requests, the `curl --http2` upgrade POST; and yet a
client that closes altogether is noticed and its generation aborted upstream.

Garbage after a complete request, half-closes after each kind of request, and the h2c upgrade are
pinned byte by byte in memory (tests/test_server_protocol.py); here the running gateway, with real
backends behind it."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.chat import chat_body
from tests.support.front import (
    LIVENESS,
    connect,
    read_to_eof,
    response_or_none,
)
from tests.support.gateway import Backend, Gateway, raw_post
from tests.support.processes import Simulator, wait_until

HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
CHAT = chat_body("sim", max_tokens=3)
STREAM = {**CHAT, "max_tokens": 5, "stream": True}
GARBAGE = b"\x00\x01garbage\r\n\r\n"


@pytest.fixture(scope="module")
def slow_simulator(tmp_path_factory):
    with Simulator.start(tmp_path_factory.mktemp("slow-sim"), "--token-rate", "5", model="slow") as simulator:
        yield simulator


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator, slow_simulator):
    backends = [Backend("sim", simulator.base_url), Backend("slow", slow_simulator.base_url)]
    with Gateway.start(tmp_path_factory.mktemp("gw-answers"), backends) as gateway:
        yield gateway


def next_response(reader, what: str):
    response = response_or_none(reader, LIVENESS)
    assert response is not None, f"the connection closed (or went silent) before {what}"
    return response


def check_health(response) -> None:
    status, _, body = response
    assert status == 200 and "models" in json.loads(body)


def check_chat(response) -> None:
    status, _, body = response
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3


def check_stream(response) -> None:
    status, headers, body = response
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body.count(b'"content":') == 6 and body.endswith(b"data: [DONE]\n\n")


# -- half-close after the requests --


def test_client_that_half_closes_after_its_requests_gets_every_answer_then_eof(gateway):
    # One request of each kind, and half-closes after each alone, are pinned in memory
    # (tests/test_server_protocol.py); here the three together, through the running gateway.
    checks = [check_health, check_chat, check_stream]
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(HEALTH + raw_post(gateway.key, CHAT) + raw_post(gateway.key, STREAM))
        sock.shutdown(socket.SHUT_WR)
        for number, check in enumerate(checks, 1):
            check(next_response(reader, f"answer {number} of {len(checks)} (sent before the half-close)"))
        assert read_to_eof(sock, already=reader.buffer) == b""


def test_client_that_closes_during_a_relayed_answer_still_aborts_the_generation(gateway, slow_simulator):
    aborted_before = slow_simulator.stats()["aborted"]
    body = {"model": "slow", "prompt": "x", "max_tokens": 50}  # ten seconds at five tokens a second
    sock, _ = connect(gateway)
    with sock:
        sock.sendall(raw_post(gateway.key, body, path="/v1/completions"))
        wait_until(lambda: slow_simulator.metrics()["vllm:num_requests_running"] == 1, timeout=LIVENESS)
    # closed altogether, mid-generation
    wait_until(lambda: slow_simulator.stats()["aborted"] == aborted_before + 1, timeout=5)
    wait_until(lambda: slow_simulator.metrics()["vllm:num_requests_running"] == 0, timeout=5)


# -- the log --


def test_invalid_http_is_logged_as_400(gateway):
    before = gateway.log_text().count("status=400")
    for data in (b"NOT HTTP AT ALL\r\n\r\n", HEALTH + GARBAGE):
        sock, _ = connect(gateway)
        with sock:
            sock.sendall(data)
            read_to_eof(sock, timeout=LIVENESS)
    try:
        wait_until(lambda: gateway.log_text(settle=0).count("status=400") >= before + 2, timeout=5)
    except TimeoutError:
        pytest.fail("invalid HTTP was answered 400 without an access-log line with status=400")
