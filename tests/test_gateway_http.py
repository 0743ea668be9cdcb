"""The gateway's own HTTP/1.1 server (server/protocol.py), spoken to over raw sockets: keep-alive,
pipelining, 100-continue, HTTP/1.0, bad requests, idle and graceful closes."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from tests.support.chat import CHAT_BYTES, chat_body
from tests.support.gateway import Backend, Gateway, Reader, raw_post

CHAT = chat_body("sim", max_tokens=3)


@pytest.fixture(scope="module")
def short_keep_alive_gateway(tmp_path_factory, simulator):
    backend = Backend("sim", simulator.base_url)
    with Gateway.start(tmp_path_factory.mktemp("gw-ka"), [backend], env={"GATEWAY_KEEPALIVE_TIMEOUT": "1"}) as gateway:
        yield gateway


def connect(gateway: Gateway) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    return sock, Reader(sock)


def test_one_connection_serves_relayed_and_api_requests_in_turn(gateway):
    sock, reader = connect(gateway)
    with sock:
        for _ in range(3):
            sock.sendall(raw_post(gateway.key, CHAT))
            status, headers, body = reader.response()
            assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
            assert headers["content-length"] == str(len(body))
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gateway.key}\r\n\r\n".encode())
            status, _, body = reader.response()
            assert status == 200 and json.loads(body)["data"][0]["id"] == "sim"


def test_pipelined_requests_are_answered_in_order(gateway):
    bodies = [{**CHAT, "max_tokens": n} for n in (1, 2, 3)]
    stream = {**CHAT, "max_tokens": 4, "stream": True}
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(
            b"".join(
                [
                    raw_post(gateway.key, bodies[0]),
                    raw_post(gateway.key, stream),
                    b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n",
                    raw_post(gateway.key, bodies[1]),
                    raw_post(gateway.key, bodies[2]),
                ]
            )
        )
        answers = [reader.response() for _ in range(5)]
    assert [status for status, _, _ in answers] == [200] * 5
    assert json.loads(answers[0][2])["usage"]["completion_tokens"] == 1
    assert answers[1][1]["transfer-encoding"] == "chunked" and answers[1][2].endswith(b"data: [DONE]\n\n")
    assert "models" in json.loads(answers[2][2])
    assert [json.loads(body)["usage"]["completion_tokens"] for _, _, body in answers[3:]] == [2, 3]


def test_expect_100_continue_gets_continue_before_the_body_is_sent(gateway):
    data = CHAT_BYTES
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(raw_post(gateway.key, data, extra="Expect: 100-continue\r\n")[: -len(data)])
        status, _, _ = reader.response()
        assert status == 100
        sock.sendall(data)
        status, _, body = reader.response()
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3


def test_expect_100_continue_with_a_too_large_body_gets_413_without_continue(gateway):
    sock, reader = connect(gateway)
    with sock:
        head = raw_post(gateway.key, b"", extra="Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: %d" % (1 << 40)
        )
        sock.sendall(head)
        status, headers, body = reader.response()
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        assert headers["connection"] == "close" and reader.closed(timeout=10)  # not a terabyte read and dropped


def test_http_1_0_stream_ends_with_the_connection(gateway):
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(raw_post(gateway.key, {**CHAT, "stream": True}, version="1.0"))
        status, headers, body = reader.response()
        assert status == 200 and "transfer-encoding" not in headers
        assert body.endswith(b"data: [DONE]\n\n")
        assert reader.closed(timeout=10)


def test_garbage_is_400_in_openai_shape_and_the_connection_closes(gateway):
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, body = reader.response()
        assert status == 400 and headers["connection"] == "close"
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
        assert reader.closed(timeout=10)


def test_a_wrong_method_on_an_api_route_is_405_in_openai_shape_and_the_connection_stays(gateway):
    sock, reader = connect(gateway)
    with sock:
        for _ in range(2):
            sock.sendall(f"PUT /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gateway.key}\r\n\r\n".encode())
            status, headers, body = reader.response()
            assert status == 405 and "connection" not in headers
            assert json.loads(body) == {
                "error": {
                    "message": "Method Not Allowed",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "method_not_allowed",
                }
            }


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(short_keep_alive_gateway):
    sock, reader = connect(short_keep_alive_gateway)
    with sock:
        sock.sendall(raw_post(short_keep_alive_gateway.key, CHAT))
        assert reader.response()[0] == 200
        assert reader.closed(timeout=20)


def test_the_keep_alive_timeout_counts_from_the_last_answer_not_the_first(short_keep_alive_gateway):
    sock, reader = connect(short_keep_alive_gateway)
    with sock:
        # Requests 0.7 s apart with a 1 s keep-alive: the third comes after the first answer's deadline.
        for number in range(3):
            if number:
                time.sleep(0.7)
            sock.sendall(raw_post(short_keep_alive_gateway.key, CHAT))
            assert reader.response()[0] == 200, f"request {number + 1}"
        assert reader.closed(timeout=20)


def test_an_active_stream_keeps_its_connection_past_the_keep_alive_timeout(short_keep_alive_gateway):
    sock, reader = connect(short_keep_alive_gateway)
    with sock:
        # Sent in two parts, a second and a half apart: a request still arriving is not an idle connection.
        request = raw_post(short_keep_alive_gateway.key, CHAT)
        sock.sendall(request[:20])
        time.sleep(1.5)
        sock.sendall(request[20:])
        assert reader.response()[0] == 200


def test_graceful_shutdown_finishes_the_stream_in_flight(tmp_path, simulator):
    long_stream = {**CHAT, "max_tokens": 200, "stream": True}  # a second at the simulator's 200 tokens/s
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)]) as gateway:
        sock, reader = connect(gateway)
        with sock:
            sock.sendall(raw_post(gateway.key, long_stream))
            while b"data: {" not in reader.buffer:
                assert reader._fill()
            gateway.handle.popen.send_signal(signal.SIGTERM)
            status, _, body = reader.response()
            assert status == 200 and body.endswith(b"data: [DONE]\n\n")
            assert body.count(b"data: {") >= 200
            assert reader.closed(timeout=30)  # and then the connection is closed, not kept alive
        # uvicorn exits through the signal it caught, once the shutdown is done
        assert gateway.handle.popen.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Finished server process" in gateway.handle.log()
