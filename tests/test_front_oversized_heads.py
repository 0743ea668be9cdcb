"""Request heads too large for the gateway (spec: GATEWAY_MAX_REQUEST_LINE_BYTES 8192,
GATEWAY_MAX_HEAD_BYTES 65536, GATEWAY_MAX_HEADERS 100): refused with 414 or 431 and a close, without
the gateway holding more than about a head's worth of them, and without holding up other clients.

Each limit, just over and just within, is pinned byte by byte in memory (tests/test_server_protocol.py);
here the running gateway's memory under a huge header, its liveness under a flood, and its log."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.front import (
    LIVENESS,
    assert_rejected,
    connect,
    max_rss_while,
    read_to_eof,
    readable,
    response_or_none,
    rss_kib,
    send_all,
    wait_until_idle,
)
from tests.support.gateway import Backend, Gateway
from tests.support.processes import wait_until

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    with Gateway.start(
        tmp_path_factory.mktemp("gw-heads"), [Backend("sim", simulator.base_url)], env={"GATEWAY_HEAD_TIMEOUT": "5"}
    ) as gateway:
        yield gateway


def get_health(headers: list[str], path: str = "/health") -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: gw", *headers]) + "\r\n\r\n").encode()


def ask(gateway: Gateway, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request, return its answer; assert the gateway answered at all."""
    sock, reader = connect(gateway)
    with sock:
        send_all(sock, data)  # a gateway that refuses early may close before all of it is sent
        response = response_or_none(reader, LIVENESS)
        assert response is not None, "no answer (or the connection closed without one)"
        if response[1].get("connection", "").lower() == "close":
            assert read_to_eof(sock, already=reader.buffer) == b""
        return response


# -- the head, fed in pieces and flooded --


def test_10_mb_header_value_sent_in_pieces_is_cut_off_with_431_without_the_gateway_growing(gateway):
    pid = gateway.handle.pid
    ask(gateway, get_health([]))  # warm: the measurement is of this request, not of a first one
    wait_until_idle(pid)
    before = peak = rss_kib(pid)
    piece = b"v" * 65536
    sent = 0
    sock, reader = connect(gateway)
    with sock:
        send_all(sock, b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Huge: ")
        while sent < 10 * MIB and not readable(sock):
            if not send_all(sock, piece):
                break
            sent += len(piece)
            peak = max(peak, rss_kib(pid))
        peak = max(peak, max_rss_while(pid, 0.5))
        assert peak - before < 4 * 1024, (
            f"the gateway grew by {(peak - before) / 1024:.1f} MB while {sent / MIB:.1f} MB of one header came in"
        )
        response = response_or_none(reader, LIVENESS)
        assert response is not None, f"no answer after {sent / MIB:.1f} MB of one header value"
        assert_rejected(response, 431, "request_header_too_large", "invalid_request_error")
        assert sent < 10 * MIB, "the gateway read all 10 MB of a header before answering"


def test_health_answers_while_two_clients_loop_requests_of_100000_headers(gateway):
    flood = get_health([f"X-{i}: y" for i in range(100_000)])
    stop = threading.Event()
    rounds = [0, 0]

    def abuse(slot: int) -> None:
        while not stop.is_set():
            try:
                sock, reader = connect(gateway, timeout=5)
            except OSError:
                continue
            with sock:
                send_all(sock, flood)
                response_or_none(reader, 5)
            rounds[slot] += 1

    abusers = [threading.Thread(target=abuse, args=(slot,), daemon=True) for slot in range(2)]
    for thread in abusers:
        thread.start()
    try:
        wait_until(lambda: min(rounds) >= 1, timeout=30)
        for _ in range(10):
            # A liveness probe's bound: the gateway answers /health within 2 s under the flood.
            sock, reader = connect(gateway, timeout=2)
            with sock:
                sock.sendall(get_health([]))
                try:
                    status, _, _ = reader.response()
                except TimeoutError:
                    pytest.fail("/health took more than 2 s to answer while two clients sent huge heads")
            assert status == 200
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in abusers:
            thread.join(LIVENESS)
    assert min(rounds) >= 2, f"the flooding clients hardly got through ({rounds} rounds)"


# -- the log --


def test_oversized_heads_appear_in_the_access_log_as_414_and_431(gateway):
    before = gateway.log_text()  # settled: earlier tests' lines are in
    for data in (
        get_health([], path="/health?pad=" + "a" * 9 * 1024),
        get_health(["X-Big: " + "b" * 70 * 1024]),
        get_health([f"X-Header-{i}: {i}" for i in range(100)]),
    ):
        sock, reader = connect(gateway)
        with sock:
            send_all(sock, data)
            response_or_none(reader, LIVENESS)

    def logged() -> bool:
        text = gateway.log_text(settle=0)
        return (
            text.count("status=414") >= before.count("status=414") + 1
            and text.count("status=431") >= before.count("status=431") + 2
        )

    try:
        wait_until(logged, timeout=5)
    except TimeoutError:
        new = gateway.log_text()[len(before) :].splitlines()
        pytest.fail(f"no status=414 / status=431 access-log lines; new log lines: {new[-5:]}")
