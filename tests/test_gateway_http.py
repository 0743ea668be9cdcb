"""The gateway's own HTTP/1.1 server (server/protocol.py) with the whole gateway behind it: relayed and API
requests in turn on one connection, 100-continue through the relay, FastAPI's errors on a kept connection
(the gateway in the test's process, tests/support/memory_gateway.py), and uvicorn's graceful shutdown (a
gateway process, over a socket). Its decisions byte by byte (pipelining, HTTP/1.0, bad requests, the
keep-alive clock) are pinned with a stand-in app by tests/test_server_protocol.py."""

from __future__ import annotations

import json
import signal
import socket

from tests.support.chat import CHAT_BYTES, chat_body
from tests.support.gateway import Backend, Gateway, Reader, raw_post

CHAT = chat_body("sim", max_tokens=3)


def connect(gateway: Gateway) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    return sock, Reader(sock)


def test_one_connection_serves_relayed_and_api_requests_in_turn(memory_gateway):
    gateway = memory_gateway
    connection = gateway.connect()
    for _ in range(3):
        connection.send(raw_post(gateway.key, CHAT))
        response = gateway.read_response(connection)
        assert response.status == 200 and json.loads(response.body)["usage"]["completion_tokens"] == 3
        assert response.header("content-length") == str(len(response.body))
        connection.send(f"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gateway.key}\r\n\r\n".encode())
        response = gateway.read_response(connection)
        assert response.status == 200 and json.loads(response.body)["data"][0]["id"] == "sim"


def test_expect_100_continue_gets_continue_before_the_body_is_sent(memory_gateway):
    gateway = memory_gateway
    data = CHAT_BYTES
    connection = gateway.connect()
    connection.send(raw_post(gateway.key, data, extra="Expect: 100-continue\r\n")[: -len(data)])
    assert gateway.read_response(connection).status == 100
    connection.send(data)
    response = gateway.read_response(connection)
    assert response.status == 200 and json.loads(response.body)["usage"]["completion_tokens"] == 3


def test_a_wrong_method_on_an_api_route_is_405_in_openai_shape_and_the_connection_stays(memory_gateway):
    gateway = memory_gateway
    connection = gateway.connect()
    for _ in range(2):
        connection.send(f"PUT /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {gateway.key}\r\n\r\n".encode())
        response = gateway.read_response(connection)
        assert response.status == 405 and response.header("connection") is None
        assert json.loads(response.body) == {
            "error": {
                "message": "Method Not Allowed",
                "type": "invalid_request_error",
                "param": None,
                "code": "method_not_allowed",
            }
        }
    assert connection.kept_alive


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
