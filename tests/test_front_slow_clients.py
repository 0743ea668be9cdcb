"""Slow clients against the gateway's front (spec: GATEWAY_HEAD_TIMEOUT, GATEWAY_BODY_TIMEOUT,
GATEWAY_SEND_TIMEOUT): connections that send nothing, heads and bodies that never finish, and a
client that stops reading a stream. With one-second timeouts.

Each clock's decisions (nothing sent, a head trickled or stalled, a body that stops or comes slowly)
are pinned with a stand-in app and timeouts of milliseconds (tests/test_server_protocol.py); here the
clocks of the whole gateway, in the test's process (tests/support/memory_gateway.py): keep-alive, the
send timeout against a real backend's stream, and the 408s in the access log. A client's full socket
buffers are a connection that stops reading (MemoryConnection.stop_reading)."""

from __future__ import annotations

import re

import pytest

from tests.support.chat import chat_body
from tests.support.front import LIVENESS, request
from tests.support.gateway import Backend, raw_post
from tests.support.http_wire import take_response
from tests.support.memory_gateway import ASKING_A_PROCESS, MemoryGateway
from tests.support.memory_server import MemoryConnection
from tests.support.processes import Simulator

HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
CHAT = chat_body("fast", max_tokens=3)
# How long to wait for what the one-second timeouts should bring about: a liveness bound, not a speed.
BOUND = 5.0
TIMEOUTS = {
    "GATEWAY_HEAD_TIMEOUT": "1",
    "GATEWAY_BODY_TIMEOUT": "1",
    "GATEWAY_SEND_TIMEOUT": "1",
    "GATEWAY_KEEPALIVE_TIMEOUT": "3",
}


@pytest.fixture(scope="module")
def fast_simulator(tmp_path_factory):
    """Tokens as fast as it can make them, and room for a million of them in one answer."""
    with Simulator.start(
        tmp_path_factory.mktemp("fast-sim"), "--token-rate", "0", "--max-model-len", "10000000", model="fast"
    ) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def memory_gateway(tmp_path_factory, fast_simulator):
    with MemoryGateway.start(
        tmp_path_factory.mktemp("gw-slow"), [Backend("fast", fast_simulator.base_url)], env=TIMEOUTS
    ) as gateway:
        yield gateway


# -- the keep-alive clock --


def test_keep_alive_connection_stays_open_past_the_head_timeout_until_the_keep_alive_timeout(memory_gateway):
    connection = memory_gateway.connect()
    connection.send(HEALTH)
    assert memory_gateway.read_response(connection).status == 200
    # Twice the head timeout, within the keep-alive timeout: an idle keep-alive connection is kept.
    memory_gateway.run(2.0)
    assert not connection.ended and connection.take() == b""
    connection.send(HEALTH)
    assert memory_gateway.read_response(connection).status == 200
    # ...and closed, without a byte, once the keep-alive timeout passes.
    assert memory_gateway.read_to_end(connection, timeout=LIVENESS) == b""


# -- the response --


def test_client_that_stops_reading_a_stream_is_dropped_and_the_generation_aborted(memory_gateway, fast_simulator):
    aborted_before = fast_simulator.stats()["aborted"]
    body = {**CHAT, "max_tokens": 1_000_000, "stream": True}
    connection = memory_gateway.connect()
    connection.send(raw_post(memory_gateway.key, body))
    memory_gateway.until(
        lambda: fast_simulator.running() == 1, LIVENESS, "the generation running", interval=ASKING_A_PROCESS
    )
    # The client reads nothing from here on: its small receive buffer is full. Past the send timeout
    # the gateway gives up on it.
    connection.stop_reading(unread=4096)
    try:
        memory_gateway.until(
            lambda: fast_simulator.stats()["aborted"] > aborted_before, LIVENESS, interval=ASKING_A_PROCESS
        )
    except AssertionError:
        pytest.fail(
            "a client that read nothing for 10 s (send timeout 1 s) was not dropped: the generation upstream still runs"
        )
    memory_gateway.until(
        lambda: fast_simulator.running() == 0, LIVENESS, "no generation running", interval=ASKING_A_PROCESS
    )
    received = memory_gateway.read_to_end(connection, timeout=LIVENESS)  # what was in flight, then the drop
    assert received.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" not in received and not received.endswith(b"0\r\n\r\n")


def read_slowly(gateway: MemoryGateway, connection: MemoryConnection, size: int, pause: float, window: int) -> bytes:
    """What a client that reads `size` bytes every `pause` seconds reads of its answer, until the answer's
    last chunk or the end of the connection. Its socket's buffers hold `window` bytes unread: once that
    much waits, the gateway may write no more (stop_reading) until the client has read half of it."""
    read = bytearray()
    unread = bytearray()
    full = False
    next_read = last_came = gateway.now() + pause

    def wake() -> bool:
        nonlocal last_came
        if data := connection.take():
            unread.extend(data)
            last_came = gateway.now()
        return gateway.now() >= next_read or (not full and len(unread) >= window)

    while not read.endswith(b"0\r\n\r\n"):
        gateway.until(wake, LIVENESS, "the client's next read")
        if not full and len(unread) >= window:
            full = True
            connection.stop_reading(unread=len(unread))
        if gateway.now() < next_read:
            continue
        if not unread and connection.ended:
            break  # all there was to read: the gateway dropped the client
        assert unread or gateway.now() - last_came < LIVENESS, f"nothing came for {LIVENESS} s ({len(read)} bytes in)"
        next_read = gateway.now() + pause
        piece = unread[:size]
        del unread[:size]
        read += piece
        if full and len(unread) <= window // 2:
            full = False
            connection.read_everything()
        elif full:
            connection.read_some(len(piece))
    return bytes(read)


def test_slow_but_steady_reader_of_a_stream_is_not_dropped(memory_gateway, fast_simulator):
    max_tokens = 4000  # about 0.9 MB of events, read at about 200 KB/s: over four send timeouts
    body = {**CHAT, "max_tokens": max_tokens, "stream": True}
    connection = memory_gateway.connect()
    connection.send(raw_post(memory_gateway.key, body))
    # Half of its buffers take longer to read than the send timeout: the gateway's send timer runs out
    # while the client still reads.
    received = read_slowly(memory_gateway, connection, size=4096, pause=0.02, window=512 * 1024)
    response, _ = take_response(received, eof=False)
    if response is None:
        pytest.fail(f"the gateway dropped a reader that read 4 KiB every 20 ms ({len(received)} bytes in)")
    assert response.status == 200
    data = response.body
    assert data.count(b'"content":') == max_tokens + 1  # the role event, then one per token
    assert data.endswith(b"data: [DONE]\n\n")
    assert fast_simulator.running() == 0


# -- the log --


def test_timeouts_that_are_answered_appear_in_the_access_log_as_408(memory_gateway):
    before = memory_gateway.log_text().count("status=408")  # settled: earlier tests' lines are in
    stalled = []
    for data in (
        b"GET /health HTTP/1.1\r\nHost: gw\r\n",  # a head that stalls
        request("POST", "/v1/chat/completions", memory_gateway.key, body=b"{", content_length=50),  # a body that stalls
    ):
        connection = memory_gateway.connect()
        connection.send(data)
        stalled.append(connection)
    memory_gateway.until(
        lambda: all(connection.ended for connection in stalled), BOUND, "answers to the stalled requests"
    )
    for connection in stalled:
        connection.disconnect()
    try:
        memory_gateway.poll(lambda: memory_gateway.log_text(settle=0).count("status=408") >= before + 2, timeout=5)
    except TimeoutError:
        lines = [line for line in memory_gateway.log_text().splitlines() if re.search(r"status=4\d\d", line)]
        pytest.fail(f"no status=408 access-log lines for a stalled head and a stalled body; 4xx lines: {lines[-5:]}")
