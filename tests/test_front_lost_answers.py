"""Answers the gateway owes and must not lose (spec: "No lost answers"): a complete request followed
by garbage, a client that half-closes after its requests, the `curl --http2` upgrade POST; and yet a
client that closes altogether is noticed and its generation aborted upstream.

Garbage after a complete request, half-closes after each kind of request, and the h2c upgrade are
pinned byte by byte with a stand-in app (tests/test_server_protocol.py); here the whole gateway with real
backends behind it: in the test's process (tests/support/memory_gateway.py) for the half-close and the
log, and as a process over a real socket for the close, which the gateway tells from a half-close by the
reset with which the client's kernel answers its probe."""

from __future__ import annotations

import json

import pytest

from tests.support.chat import chat_body
from tests.support.front import LIVENESS, connect
from tests.support.gateway import Backend, Gateway, raw_post
from tests.support.http_wire import WireResponse
from tests.support.memory_gateway import MemoryGateway
from tests.support.memory_server import MemoryConnection
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


def next_response(gateway: MemoryGateway, connection: MemoryConnection, what: str) -> WireResponse:
    """The next final response: an interim `100 Continue`, with which the gateway may probe a client
    that half-closed, is skipped, as every HTTP/1.1 client skips it."""
    while True:
        try:
            response = gateway.read_response(connection)
        except AssertionError as error:
            pytest.fail(f"the connection closed (or went silent) before {what}: {error}")
        if not response.interim:
            return response


def check_health(response: WireResponse) -> None:
    assert response.status == 200 and "models" in json.loads(response.body)


def check_chat(response: WireResponse) -> None:
    assert response.status == 200 and json.loads(response.body)["usage"]["completion_tokens"] == 3


def check_stream(response: WireResponse) -> None:
    assert response.status == 200 and response.header("transfer-encoding") == "chunked"
    body = response.body
    assert body.count(b'"content":') == 6 and body.endswith(b"data: [DONE]\n\n")


# -- half-close after the requests --


def test_client_that_half_closes_after_its_requests_gets_every_answer_then_eof(memory_gateway):
    # One request of each kind, and half-closes after each alone, are pinned with a stand-in app
    # (tests/test_server_protocol.py); here the three together, through the whole gateway.
    gateway = memory_gateway
    checks = [check_health, check_chat, check_stream]
    connection = gateway.connect()
    connection.send(HEALTH + raw_post(gateway.key, CHAT) + raw_post(gateway.key, STREAM), eof=True)
    for number, check in enumerate(checks, 1):
        check(next_response(gateway, connection, f"answer {number} of {len(checks)} (sent before the half-close)"))
    assert gateway.read_to_end(connection) == b""


def test_client_that_closes_during_a_relayed_answer_still_aborts_the_generation(gateway, slow_simulator):
    # A gateway process over a real socket: the client's close reaches the gateway as a half-close, and
    # only the reset with which the client's kernel answers the gateway's probe tells it apart.
    aborted_before = slow_simulator.stats()["aborted"]
    body = {"model": "slow", "prompt": "x", "max_tokens": 50}  # ten seconds at five tokens a second
    sock, _ = connect(gateway)
    with sock:
        sock.sendall(raw_post(gateway.key, body, path="/v1/completions"))
        wait_until(lambda: slow_simulator.running() == 1, timeout=LIVENESS)
    # closed altogether, mid-generation
    wait_until(lambda: slow_simulator.stats()["aborted"] == aborted_before + 1, timeout=5)
    wait_until(lambda: slow_simulator.running() == 0, timeout=5)


# -- the log --


def test_invalid_http_is_logged_as_400(memory_gateway):
    gateway = memory_gateway
    before = gateway.log_text().count("status=400")
    for data in (b"NOT HTTP AT ALL\r\n\r\n", HEALTH + GARBAGE):
        connection = gateway.connect()
        connection.send(data)
        gateway.read_to_end(connection)
        connection.disconnect()
    try:
        gateway.poll(lambda: gateway.log_text(settle=0).count("status=400") >= before + 2, timeout=5)
    except TimeoutError:
        pytest.fail("invalid HTTP was answered 400 without an access-log line with status=400")
