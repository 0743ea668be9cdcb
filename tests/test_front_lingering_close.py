"""Answers that close the connection while the client is still sending reach the client (nginx's
lingering close): a head over its limits, a body refused on its head or over its limit, bytes that are
not HTTP. A socket closed with unread bytes resets the connection, and the reset can destroy the answer
before the client reads it (`ConnectionResetError` instead of the 431). So the gateway sends the answer,
ends its side, and reads and drops what still comes, within GATEWAY_LINGER_TIMEOUT and
GATEWAY_LINGER_BYTES, before it closes.

Here each way to such an answer from the whole gateway, in the test's process (tests/support/memory_gateway.py):
the answer, and the gateway's side ended while it reads every byte the client still sends, never a close
that a socket would turn into a reset. The first, over a real socket to a gateway process: that the reset
would destroy the answer is the kernel's doing. What follows the answer (nothing more answered, a kept
connection unaffected, the bounds of GATEWAY_LINGER_BYTES and GATEWAY_LINGER_TIMEOUT) is pinned with a
stand-in app (tests/test_server_protocol.py).
"""

from __future__ import annotations

import socket

import pytest

from tests.support.front import (
    LIVENESS,
    assert_rejected,
    read_to_eof,
    request,
    response_or_none,
)
from tests.support.gateway import Backend, Gateway, Reader, raw_post
from tests.support.http_wire import WireResponse, take_response
from tests.support.memory_gateway import MemoryGateway

MIB = 1024 * 1024
WRONG_KEY = "sk-" + "x" * 43
# What a client's socket takes of its request at a time: its send buffer (SO_SNDBUF 64 KiB over a socket).
SEND_BUFFER = 65536


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    with Gateway.start(tmp_path_factory.mktemp("gw-linger"), [Backend("sim", simulator.base_url)]) as gateway:
        yield gateway


def health_with_headers(count: int) -> bytes:
    return ("GET /health HTTP/1.1\r\nHost: gw\r\n" + "".join(f"X-{i}: y\r\n" for i in range(count)) + "\r\n").encode()


def parts(response: WireResponse) -> tuple[int, dict[str, str], bytes]:
    """A response as assert_rejected takes it."""
    return response.status, dict(response.headers), response.body


def send_in_pieces_then_read(gateway: MemoryGateway, data: bytes) -> list[WireResponse]:
    """send_everything_then_read with the gateway in the test's process: the request goes a socket's send
    buffer at a time, each piece once the gateway has read the one before (a blocking send), so that
    most of `data` is still to come when the gateway answers. Closed meanwhile, a socket would reset the
    connection as the rest arrived, and the reset can destroy the answer: the gateway must only end its
    side, and read on."""
    connection = gateway.connect()
    for start in range(0, len(data), SEND_BUFFER):
        connection.send(data[start : start + SEND_BUFFER])
        gateway.until(
            lambda: connection.gone or not connection.transport.inbox, what="the gateway reading what the client sends"
        )
        if connection.gone:
            pytest.fail(f"the gateway closed the connection while the request was being sent ({start} bytes sent)")
    received = gateway.read_to_end(connection)
    answers = []
    while received:
        response, used = take_response(received, eof=True)
        assert response is not None
        answers.append(response)
        received = received[used:]
        if response.closes:
            assert received == b"", "bytes after a closing answer"
    assert answers, "no answer"
    connection.disconnect()
    return answers


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
    # A gateway process over a real socket: a reset that would destroy the answer is the kernel's doing,
    # which the in-memory connections of the tests below do not show.
    (answer,) = send_everything_then_read(gateway, health_with_headers(100_000))
    assert_rejected(answer, 431, "request_header_too_large", "invalid_request_error")


def test_a_request_line_over_the_limit_followed_by_megabytes_gets_its_414(memory_gateway):
    gateway = memory_gateway
    data = b"GET /health?pad=" + b"a" * 3 * MIB + b" HTTP/1.1\r\nHost: gw\r\n\r\n"
    (answer,) = send_in_pieces_then_read(gateway, data)
    assert_rejected(parts(answer), 414, "request_line_too_long", "invalid_request_error")


def test_a_whole_body_sent_with_a_wrong_key_gets_its_401(memory_gateway):
    gateway = memory_gateway
    body = b'{"model": "sim", "pad": "' + b"p" * 4 * MIB + b'"}'
    (answer,) = send_in_pieces_then_read(gateway, raw_post(WRONG_KEY, body))
    assert_rejected(parts(answer), 401, "invalid_api_key", "invalid_request_error")


def test_a_whole_body_declared_over_the_limit_gets_its_413(memory_gateway):
    gateway = memory_gateway
    body = b"z" * 4 * MIB  # over GATEWAY_MAX_ADMIN_BODY_BYTES (64 KiB), declared and sent
    (answer,) = send_in_pieces_then_read(gateway, request("POST", "/admin/keys", gateway.admin_key, body=body))
    assert_rejected(parts(answer), 413, "body_too_large", "invalid_request_error")


def test_a_chunked_body_found_over_the_limit_while_read_gets_its_413(memory_gateway):
    gateway = memory_gateway
    piece = b"z" * 16384
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(200)) + b"0\r\n\r\n"  # 3.2 MB
    head = f"POST /admin/keys HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gateway.admin_key}\r\n"
    head += "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    (answer,) = send_in_pieces_then_read(gateway, head.encode() + chunks)
    assert_rejected(parts(answer), 413, "body_too_large", "invalid_request_error")


def test_a_good_request_followed_by_megabytes_that_are_not_http_gets_its_answer_then_400(memory_gateway):
    gateway = memory_gateway
    data = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n" + b"\x01 not http \x02" * (MIB // 4)
    first, second = send_in_pieces_then_read(gateway, data)
    assert first.status == 200
    assert_rejected(parts(second), 400, "invalid_http", "invalid_request_error")
