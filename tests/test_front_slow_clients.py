"""Slow clients against the gateway's front (spec: GATEWAY_HEAD_TIMEOUT, GATEWAY_BODY_TIMEOUT,
GATEWAY_SEND_TIMEOUT): connections that send nothing, heads and bodies that never finish, and a
client that stops reading a stream. All over raw sockets, with one-second timeouts.

Each clock's decisions (nothing sent, a head trickled or stalled, a body that stops or comes slowly)
are pinned in memory with timeouts of milliseconds (tests/test_server_protocol.py); here the clocks
of the running gateway: keep-alive, the send timeout against a real backend's stream, and the 408s
in the access log."""

from __future__ import annotations

import re
import threading

import pytest

from tests.support.chat import chat_body
from tests.support.front import (
    LIVENESS,
    SlowReader,
    closed_without_bytes,
    connect,
    read_to_eof,
    request,
    response_or_none,
    still_open,
)
from tests.support.gateway import Backend, Gateway, raw_post
from tests.support.processes import Simulator, wait_until

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
def gateway(tmp_path_factory, fast_simulator):
    with Gateway.start(
        tmp_path_factory.mktemp("gw-slow"), [Backend("fast", fast_simulator.base_url)], env=TIMEOUTS
    ) as gateway:
        yield gateway


# -- the keep-alive clock --


def test_keep_alive_connection_stays_open_past_the_head_timeout_until_the_keep_alive_timeout(gateway):
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(HEALTH)
        assert reader.response()[0] == 200
        # Twice the head timeout, within the keep-alive timeout: an idle keep-alive connection is kept.
        assert still_open(sock, 2.0)
        sock.sendall(HEALTH)
        assert reader.response()[0] == 200
        # ...and closed, without a byte, once the keep-alive timeout passes.
        assert closed_without_bytes(sock, timeout=LIVENESS) == b""


# -- the response --


def test_client_that_stops_reading_a_stream_is_dropped_and_the_generation_aborted(gateway, fast_simulator):
    aborted_before = fast_simulator.stats()["aborted"]
    body = {**CHAT, "max_tokens": 1_000_000, "stream": True}
    sock, _ = connect(gateway, rcvbuf=4096)
    with sock:
        sock.sendall(raw_post(gateway.key, body))
        wait_until(lambda: fast_simulator.metrics()["vllm:num_requests_running"] == 1, timeout=LIVENESS)
        # The client reads nothing from here on. Past the send timeout the gateway gives up on it.
        try:
            wait_until(lambda: fast_simulator.stats()["aborted"] > aborted_before, timeout=LIVENESS)
        except TimeoutError:
            pytest.fail(
                "a client that read nothing for 10 s (send timeout 1 s) was not dropped: "
                "the generation upstream still runs"
            )
        wait_until(lambda: fast_simulator.metrics()["vllm:num_requests_running"] == 0, timeout=LIVENESS)
        received = read_to_eof(sock, timeout=LIVENESS)  # what was in flight, then the drop
    assert received.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" not in received and not received.endswith(b"0\r\n\r\n")


def test_slow_but_steady_reader_of_a_stream_is_not_dropped(gateway, fast_simulator):
    max_tokens = 4000  # about 0.9 MB of events, read at about 200 KB/s: over four send timeouts
    body = {**CHAT, "max_tokens": max_tokens, "stream": True}
    sock, _ = connect(gateway, rcvbuf=16384)
    with sock:
        sock.sendall(raw_post(gateway.key, body))
        reader = SlowReader(sock, size=4096, pause=0.02)
        try:
            status, _, data = reader.response()
        except (EOFError, ConnectionResetError):
            pytest.fail(f"the gateway dropped a reader that read 4 KiB every 20 ms ({reader.received} bytes in)")
    assert status == 200
    assert data.count(b'"content":') == max_tokens + 1  # the role event, then one per token
    assert data.endswith(b"data: [DONE]\n\n")
    assert fast_simulator.metrics()["vllm:num_requests_running"] == 0


# -- the log --


def test_timeouts_that_are_answered_appear_in_the_access_log_as_408(gateway):
    def stall(data: bytes) -> None:
        sock, reader = connect(gateway)
        with sock:
            sock.sendall(data)
            response_or_none(reader, BOUND)

    before = gateway.log_text().count("status=408")  # settled: earlier tests' lines are in
    threads = [
        threading.Thread(target=stall, args=(data,), daemon=True)
        for data in (
            b"GET /health HTTP/1.1\r\nHost: gw\r\n",  # a head that stalls
            request("POST", "/v1/chat/completions", gateway.key, body=b"{", content_length=50),  # a body that stalls
        )
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND + 5)
    try:
        wait_until(lambda: gateway.log_text(settle=0).count("status=408") >= before + 2, timeout=5)
    except TimeoutError:
        lines = [line for line in gateway.log_text().splitlines() if re.search(r"status=4\d\d", line)]
        pytest.fail(f"no status=408 access-log lines for a stalled head and a stalled body; 4xx lines: {lines[-5:]}")
