"""Answers that close the connection while the client is still sending reach the client (nginx's
lingering close): a head over its limits, a body refused on its head or over its limit, bytes that are
not HTTP. A socket closed with unread bytes resets the connection, and the reset can destroy the answer
before the client reads it (`ConnectionResetError` instead of the 431). So the gateway sends the answer,
ends its side, and reads and drops what still comes, within GATEWAY_LINGER_TIMEOUT and
GATEWAY_LINGER_BYTES, before it closes.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.support.chat import chat_body
from tests.support.front import (
    LIVENESS,
    assert_rejected,
    connect,
    read_to_eof,
    request,
    response_or_none,
    send_all,
)
from tests.support.gateway import Backend, Gateway, Reader, raw_post

MIB = 1024 * 1024
WRONG_KEY = "sk-" + "x" * 43
CHAT = chat_body("sim", max_tokens=2)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    with Gateway.start(tmp_path_factory.mktemp("gw-linger"), [Backend("sim", simulator.base_url)]) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def tight_gateway(tmp_path_factory, simulator):
    """A gateway that lingers at most 1 s and 1 MiB."""
    env = {"GATEWAY_LINGER_TIMEOUT": "1", "GATEWAY_LINGER_BYTES": str(MIB)}
    with Gateway.start(
        tmp_path_factory.mktemp("gw-linger-tight"), [Backend("sim", simulator.base_url)], env=env
    ) as gateway:
        yield gateway


def health_with_headers(count: int) -> bytes:
    return ("GET /health HTTP/1.1\r\nHost: gw\r\n" + "".join(f"X-{i}: y\r\n" for i in range(count)) + "\r\n").encode()


def send_everything_then_read(gateway: Gateway, data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """What a simple client does: send its whole request, then read every answer until the close.

    Its send buffer is small, as a real network's window is: most of `data` is still to be sent when
    the gateway answers, rather than all of it waiting in the loopback's buffers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sock.settimeout(LIVENESS)
    sock.connect(("127.0.0.1", gateway.port))
    reader = Reader(sock)
    with sock:
        try:
            sock.sendall(data)
        except OSError as error:
            pytest.fail(f"the gateway reset the connection while the request was being sent: {error!r}")
        answers = []
        while True:
            try:
                response = response_or_none(reader, LIVENESS)
            except OSError as error:
                pytest.fail(f"the answer was lost to a reset: {error!r} (answers so far: {answers})")
            if response is None:
                break
            answers.append(response)
            if response[1].get("connection", "").lower() == "close":
                assert read_to_eof(sock, already=reader.buffer) == b"", "bytes after a closing answer"
                break
        assert answers, "no answer (or the connection was reset before it could be read)"
        return answers


def test_a_head_of_100000_small_headers_gets_its_431_not_a_reset(gateway):
    (answer,) = send_everything_then_read(gateway, health_with_headers(100_000))
    assert_rejected(answer, 431, "request_header_too_large", "invalid_request_error")


def test_a_request_line_over_the_limit_followed_by_megabytes_gets_its_414(gateway):
    data = b"GET /health?pad=" + b"a" * 3 * MIB + b" HTTP/1.1\r\nHost: gw\r\n\r\n"
    (answer,) = send_everything_then_read(gateway, data)
    assert_rejected(answer, 414, "request_line_too_long", "invalid_request_error")


def test_a_whole_body_sent_with_a_wrong_key_gets_its_401(gateway):
    body = b'{"model": "sim", "pad": "' + b"p" * 4 * MIB + b'"}'
    (answer,) = send_everything_then_read(gateway, raw_post(WRONG_KEY, body))
    assert_rejected(answer, 401, "invalid_api_key", "invalid_request_error")


def test_a_whole_body_declared_over_the_limit_gets_its_413(gateway):
    body = b"z" * 4 * MIB  # over GATEWAY_MAX_ADMIN_BODY_BYTES (64 KiB), declared and sent
    (answer,) = send_everything_then_read(gateway, request("POST", "/admin/keys", gateway.admin_key, body=body))
    assert_rejected(answer, 413, "body_too_large", "invalid_request_error")


def test_a_chunked_body_found_over_the_limit_while_read_gets_its_413(gateway):
    piece = b"z" * 16384
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(200)) + b"0\r\n\r\n"  # 3.2 MB
    head = f"POST /admin/keys HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gateway.admin_key}\r\n"
    head += "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    (answer,) = send_everything_then_read(gateway, head.encode() + chunks)
    assert_rejected(answer, 413, "body_too_large", "invalid_request_error")


def test_a_good_request_followed_by_megabytes_that_are_not_http_gets_its_answer_then_400(gateway):
    data = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n" + b"\x01 not http \x02" * (MIB // 4)
    first, second = send_everything_then_read(gateway, data)
    assert first[0] == 200
    assert_rejected(second, 400, "invalid_http", "invalid_request_error")


def test_nothing_sent_after_a_refused_request_is_answered(gateway):
    # The refused request's body, then a whole request: the connection is ending, so the second is
    # read and dropped, never served.
    data = (
        request("POST", "/v1/chat/completions", WRONG_KEY, body=b"{}" * 5) + b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
    )
    (answer,) = send_everything_then_read(gateway, data)
    assert answer[0] == 401


def test_a_kept_alive_connection_is_unaffected(gateway):
    sock, reader = connect(gateway)
    with sock:
        for _ in range(3):
            sock.sendall(raw_post(gateway.key, CHAT))
            status, headers, _ = reader.response()
            assert status == 200 and headers.get("connection", "") != "close"


# -- the bounds --


def trigger_431(gateway: Gateway) -> socket.socket:
    """A connection whose head was refused (101 header lines), its 431 read."""
    sock, reader = connect(gateway)
    sock.sendall(health_with_headers(101))
    response = response_or_none(reader, LIVENESS)
    assert response is not None and response[0] == 431
    return sock


def test_lingering_ends_after_gateway_linger_bytes(tight_gateway):
    with trigger_431(tight_gateway) as sock:
        sent = 0
        piece = b"z" * 65536
        while sent < 256 * MIB and send_all(sock, piece):
            sent += len(piece)
    # 1 MiB read and dropped, then the close; what else went out is what the sockets' buffers took.
    assert sent >= MIB, f"the gateway closed after {sent} bytes, before its 1 MiB"
    assert sent < 256 * MIB, "the gateway read and dropped 256 MiB after its answer"


def test_lingering_ends_after_gateway_linger_timeout(tight_gateway):
    with trigger_431(tight_gateway) as sock:
        started = time.monotonic()
        while time.monotonic() - started < LIVENESS and send_all(sock, b"z"):
            time.sleep(0.1)  # a trickle that keeps the connection busy, far below the byte bound
        lasted = time.monotonic() - started
    assert lasted < LIVENESS, f"the gateway still read a trickling client {LIVENESS} s after its answer"
    assert lasted > 0.5, f"the gateway closed {lasted:.2f} s after its answer, long before its 1 s"
