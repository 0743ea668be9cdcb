"""Request heads too large for the gateway (spec: GATEWAY_MAX_REQUEST_LINE_BYTES 8192,
GATEWAY_MAX_HEAD_BYTES 65536, GATEWAY_MAX_HEADERS 100): refused with 414 or 431 and a close, without
the gateway holding more than about a head's worth of them, and without holding up other clients.

Each limit, just over and just within, is pinned byte by byte with a stand-in app
(tests/test_server_protocol.py); here the whole gateway, in the test's process
(tests/support/memory_gateway.py): its memory under a huge header, its liveness under a flood, and its log."""

from __future__ import annotations

import os

import pytest

from tests.support.front import assert_rejected, rss_kib
from tests.support.gateway import Backend
from tests.support.http_wire import WireResponse
from tests.support.memory_gateway import MemoryGateway

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def memory_gateway(tmp_path_factory, simulator):
    with MemoryGateway.start(
        tmp_path_factory.mktemp("gw-heads"), [Backend("sim", simulator.base_url)], env={"GATEWAY_HEAD_TIMEOUT": "5"}
    ) as gateway:
        yield gateway


def get_health(headers: list[str], path: str = "/health") -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: gw", *headers]) + "\r\n\r\n").encode()


def parts(response: WireResponse) -> tuple[int, dict[str, str], bytes]:
    """A response as assert_rejected takes it."""
    return response.status, dict(response.headers), response.body


def ask(gateway: MemoryGateway, data: bytes) -> WireResponse:
    """Send one request, return its answer; assert the gateway answered at all."""
    connection = gateway.connect()
    connection.send(data)
    response = gateway.read_response(connection)
    if response.closes:
        assert gateway.read_to_end(connection) == b""
    connection.disconnect()
    return response


# -- the head, fed in pieces and flooded --


def test_10_mb_header_value_sent_in_pieces_is_cut_off_with_431_without_the_gateway_growing(memory_gateway):
    pid = os.getpid()  # the test's process, which holds the gateway
    piece = b"v" * 65536
    ask(memory_gateway, get_health([]))  # warm: the measurement is of this request, not of a first one
    memory_gateway.run(0.6)  # idle
    before = peak = rss_kib(pid)
    sent = 0
    connection = memory_gateway.connect()
    connection.send(b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Huge: ")
    # Until the gateway answers or ends the connection: until a client's socket turns readable.
    while sent < 10 * MIB and not (connection.transport.written or connection.ended):
        connection.send(piece)
        sent += len(piece)
        peak = max(peak, rss_kib(pid))
    peak = max(peak, memory_gateway.max_rss(0.5))
    assert peak - before < 4 * 1024, (
        f"the gateway grew by {(peak - before) / 1024:.1f} MB while {sent / MIB:.1f} MB of one header came in"
    )
    response = memory_gateway.read_response(connection)
    assert_rejected(parts(response), 431, "request_header_too_large", "invalid_request_error")
    assert sent < 10 * MIB, "the gateway read all 10 MB of a header before answering"
    connection.disconnect()


def test_health_answers_while_two_clients_loop_requests_of_100000_headers(memory_gateway):
    # The gateway's one loop serves the flooding clients and the probe alike: each probe's two seconds
    # count from before the two floods that come ahead of it.
    flood = get_health([f"X-{i}: y" for i in range(100_000)])
    rounds = [0, 0]

    def abuse(slot: int) -> None:
        """One round of a flooding client: a connection, a huge head, the answer and the end, the close."""
        connection = memory_gateway.connect()
        connection.send(flood)
        memory_gateway.until(lambda: connection.ended, 5, what="the answer to a flood")
        connection.disconnect()
        rounds[slot] += 1

    for slot in range(2):
        abuse(slot)
    for _ in range(10):
        asked = memory_gateway.now()
        for slot in range(2):
            abuse(slot)
        probe = memory_gateway.connect()
        probe.send(get_health([]))
        try:
            # A liveness probe's bound: the gateway answers /health within 2 s under the flood.
            response = memory_gateway.read_response(probe, timeout=max(0.0, asked + 2 - memory_gateway.now()))
        except AssertionError:
            pytest.fail("/health took more than 2 s to answer while two clients sent huge heads")
        assert response.status == 200
        probe.disconnect()
        memory_gateway.run(0.1)
    assert min(rounds) >= 2, f"the flooding clients hardly got through ({rounds} rounds)"


# -- the log --


def test_oversized_heads_appear_in_the_access_log_as_414_and_431(memory_gateway):
    before = memory_gateway.log_text()  # settled: earlier tests' lines are in
    for data in (
        get_health([], path="/health?pad=" + "a" * 9 * 1024),
        get_health(["X-Big: " + "b" * 70 * 1024]),
        get_health([f"X-Header-{i}: {i}" for i in range(100)]),
    ):
        connection = memory_gateway.connect()
        connection.send(data)
        memory_gateway.read_response(connection)
        connection.disconnect()

    def logged() -> bool:
        text = memory_gateway.log_text(settle=0)
        return (
            text.count("status=414") >= before.count("status=414") + 1
            and text.count("status=431") >= before.count("status=431") + 2
        )

    try:
        memory_gateway.poll(logged, timeout=5)
    except TimeoutError:
        new = memory_gateway.log_text()[len(before) :].splitlines()
        pytest.fail(f"no status=414 / status=431 access-log lines; new log lines: {new[-5:]}")
