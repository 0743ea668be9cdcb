"""The relay's HTTP client against backends that misbehave at the HTTP level.

A small socket server stands in for vLLM here, because the faults are below what a simulator speaks:
idle keep-alive connections dropped by the server, bodies that end with the connection, garbage.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time

import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, raw_post
from tests.support.memory_gateway import MemoryGateway
from tests.support.memory_server import MemoryConnection
from tests.support.raw_backend import ThreadedBackend

MODELS = b'{"object":"list","data":[{"id":"raw","object":"model"}]}'
# 8 MB of numbered events: far more than the gateway holds for a client that is not reading.
BURST_EVENTS = [b'data: {"n": %d, "pad": "%s"}\n\n' % (n, b"x" * 2000) for n in range(4000)]
# An error in OpenAI's shape longer than the gateway reads of an error (vLLM quoting a long input back).
LONG_OPENAI_ERROR = b'{"error":{"message":"%s","type":"BadRequestError","param":null,"code":400}}' % (b"y" * 200_000)
GZIP_ERROR = gzip.compress(b'{"detail": "Internal Server Error"}')
PROXY_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
REPLY = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}'


def chunk(data: bytes) -> bytes:
    """`data` framed as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class RawBackend(ThreadedBackend):
    """Answers /health and /v1/models normally; generation requests as `mode` says."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.padding = 800 * 1024  # bytes of header lines in mode padded-head
        self.dropped = threading.Event()  # the gateway closed a connection this backend was answering on
        self.generations = 0
        self.generation_connections: set[int] = set()
        self.bytes_sent = 0
        self.finished = threading.Event()
        super().__init__()

    def connection(self, conn: socket.socket) -> None:
        with conn:
            self._exchange(conn)

    def _exchange(self, conn: socket.socket) -> None:
        buffer = b""
        answered_here = padded_here = False
        while True:
            while b"\r\n\r\n" not in buffer:
                try:
                    data = conn.recv(65536)
                except ConnectionResetError:
                    data = b""  # the gateway closed with some of an answer unread
                if not data:
                    if padded_here:
                        self.dropped.set()
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = int(
                next(
                    (
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    b"0",
                )
            )
            while len(buffer) < length:
                buffer += conn.recv(65536)
            buffer = buffer[length:]
            path = head.split(b" ")[1]
            if path in (b"/health", b"/v1/models"):
                body = MODELS if path == b"/v1/models" else b""
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                continue
            if path == b"/tokenize":
                # Asked to count the prompt of an answer without usage: this backend does not, and the
                # gateway estimates it (prompt_count.py), rather than take the question for a generation.
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                continue
            if self.mode == "close-idle":
                if answered_here:
                    # Keep-alive promised, yet the next request finds the connection closed, as
                    # when uvicorn under vLLM drops an idle connection just as it is reused.
                    return
                self.generations += 1
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY)
                )
                answered_here = True
                continue
            self.generations += 1
            self.generation_connections.add(id(conn))
            if self.mode == "keep-alive":
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY)
                )
                continue
            if self.mode == "firehose":
                # An endless stream, written as fast as the gateway takes it.
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                event = b"data: " + b"x" * 65000 + b"\n\n"
                framed = chunk(event)
                try:
                    while True:
                        conn.sendall(framed)
                        self.bytes_sent += len(event)
                except OSError:
                    return
            if self.mode == "burst":
                # A finite stream sent in bursts of a hundred events per write, so one read by the
                # gateway brings many chunks at once.
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                for start in range(0, len(BURST_EVENTS), 100):
                    conn.sendall(b"".join(map(chunk, BURST_EVENTS[start : start + 100])))
                conn.sendall(b"0\r\n\r\n")
                continue
            if self.mode in ("slow-events", "slow-json"):
                # A body with a Content-Length that is written over a second and a half, as nginx's
                # limit_rate or a slow server would: the relay must pass each piece on as it comes.
                kind = b"text/event-stream" if self.mode == "slow-events" else b"application/json"
                pieces = [b'data: {"n": %d}\n\n' % n for n in range(5)]
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (kind, sum(map(len, pieces)))
                )
                for n, piece in enumerate(pieces):
                    time.sleep(0.3 if n else 0)
                    conn.sendall(piece)
                self.finished.set()
                continue
            if self.mode in ("padded-head", "endless-head"):
                # Header lines by the hundred (a misconfigured server, or one turned against the
                # gateway), then a body; or header lines that never end.
                line = b"X-Pad: " + b"p" * 991 + b"\r\n"  # 1000 bytes with the line's CRLF
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                    if self.mode == "padded-head":
                        conn.sendall(line * (self.padding // len(line)))
                        conn.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(REPLY), REPLY))
                        padded_here = True
                        continue
                    for _ in range(100_000):  # 100 MB at most
                        conn.sendall(line * 64)
                except OSError:
                    self.dropped.set()
                return
            if self.mode == "proxy-page":
                # An HTML error page from a proxy in between, its length told by the end of the connection.
                conn.sendall(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n" + PROXY_PAGE
                )
                return
            if self.mode == "endless-text-error":
                # A plain-text 500 that never ends: the gateway must answer from its start.
                conn.sendall(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                try:
                    while True:
                        conn.sendall(chunk(b"Traceback: the engine failed. " * 1000))
                        self.bytes_sent += 30_000
                except OSError:
                    self.finished.set()
                    return
            if self.mode == "gzip-error":
                conn.sendall(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(GZIP_ERROR) + GZIP_ERROR
                )
                continue
            if self.mode == "long-openai-error":
                conn.sendall(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    % len(LONG_OPENAI_ERROR)
                    + LONG_OPENAI_ERROR
                )
                continue
            if self.mode == "dies-before-body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
                return
            if self.mode == "until-close":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + REPLY)
                return
            conn.sendall(b"this is not HTTP\r\n\r\n")
            return


@pytest.fixture
def raw_gateway(tmp_path, request):
    backend = RawBackend(request.param)
    with MemoryGateway.start(tmp_path, [Backend("raw", backend.url)]) as gateway:
        yield gateway, backend
    backend.close()


CHAT = chat_body("raw")


def ask_for_a_stream_then_stop_reading(gateway: MemoryGateway) -> MemoryConnection:
    """A client that has asked for a stream, had its head, and reads nothing more: its 64 KB socket
    buffer is full, which pushes back on the gateway."""
    connection = gateway.connect()
    connection.send(raw_post(gateway.key, {**CHAT, "stream": True}))
    assert gateway.read_until(connection, b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    connection.stop_reading(unread=65536)
    return connection


@pytest.mark.parametrize("raw_gateway", ["keep-alive"], indirect=True)
def test_sequential_requests_reuse_one_upstream_connection(raw_gateway):
    gateway, backend = raw_gateway
    with gateway.http(gateway.key) as client:
        statuses = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(5)]
    assert statuses == [200] * 5
    assert len(backend.generation_connections) == 1


@pytest.mark.parametrize("raw_gateway", ["close-idle"], indirect=True)
def test_idle_connections_closed_by_the_backend_are_retried_transparently(raw_gateway):
    gateway, backend = raw_gateway
    with gateway.http(gateway.key) as client:
        statuses = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(5)]
    assert statuses == [200] * 5
    assert backend.generations == 5


@pytest.mark.parametrize("raw_gateway", ["until-close"], indirect=True)
def test_body_that_ends_with_the_connection_is_relayed_whole(raw_gateway):
    gateway, _ = raw_gateway
    with gateway.http(gateway.key) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.content == REPLY
    line = next(row for row in gateway.log_text().splitlines() if "model=raw" in row)
    assert line.endswith("prompt_tokens=1 completion_tokens=2")


@pytest.mark.parametrize("raw_gateway", ["garbage", "dies-before-body"], indirect=True)
def test_backend_speaking_garbage_or_dying_before_its_body_gives_502_in_openai_shape(raw_gateway):
    gateway, _ = raw_gateway
    with gateway.http(gateway.key) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


@pytest.mark.parametrize("raw_gateway", ["proxy-page"], indirect=True)
def test_a_proxys_html_error_page_reaches_the_client_as_an_openai_error(raw_gateway):
    gateway, _ = raw_gateway
    with gateway.http(gateway.key) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {
            "message": "502 Bad Gateway 502 Bad Gateway nginx",
            "type": "server_error",
            "param": None,
            "code": "bad_gateway",
        }
    }


@pytest.mark.parametrize("raw_gateway", ["endless-text-error"], indirect=True)
def test_an_endless_error_body_is_answered_from_its_start_and_its_connection_closed(raw_gateway):
    gateway, backend = raw_gateway
    body = b""
    with gateway.http(gateway.key) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    body = response.content
    assert len(body) < 1_000_000, "the endless error went on to the client"
    assert response.status_code == 500
    error = json.loads(body)["error"]
    assert error["code"] == "internal_server_error" and error["type"] == "server_error"
    assert error["message"].startswith("Traceback: the engine failed. Traceback:")
    assert error["message"].endswith("...") and len(error["message"]) == 1003
    gateway.until(backend.finished.is_set, 10, what="the gateway to stop reading the backend's endless error")


@pytest.mark.parametrize("raw_gateway", ["gzip-error"], indirect=True)
def test_an_encoded_error_body_which_the_gateway_cannot_read_is_relayed_as_it_came(raw_gateway):
    gateway, _ = raw_gateway
    with gateway.http(gateway.key) as client, client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
        raw = b"".join(response.iter_raw())  # as it came, not decoded
    assert response.status_code == 500
    assert response.headers["content-encoding"] == "gzip"
    assert raw == GZIP_ERROR


@pytest.mark.parametrize("raw_gateway", ["long-openai-error"], indirect=True)
def test_a_long_error_already_in_openai_shape_is_relayed_byte_for_byte(raw_gateway):
    gateway, _ = raw_gateway
    with gateway.http(gateway.key) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400
    assert response.content == LONG_OPENAI_ERROR


@pytest.mark.parametrize("raw_gateway", ["firehose"], indirect=True)
def test_a_client_that_stops_reading_stops_the_backend_too(raw_gateway):
    gateway, backend = raw_gateway
    connection = ask_for_a_stream_then_stop_reading(gateway)
    gateway.run(3)  # the gateway must stop reading from the backend
    written, sent = len(connection.transport.written), backend.bytes_sent
    gateway.run(1)
    assert backend.bytes_sent == sent, "the backend kept writing while nobody read"
    assert len(connection.transport.written) == written, "the gateway kept writing to a client that reads nothing"
    # What piled up is socket buffers plus the gateway's bound, not the backend's whole output.
    assert sent < 32 * 1024 * 1024


@pytest.mark.parametrize("raw_gateway", ["slow-events", "slow-json"], indirect=True)
def test_a_body_with_a_length_is_relayed_piece_by_piece_not_held_back(raw_gateway):
    gateway, backend = raw_gateway
    connection = gateway.connect()
    connection.send(raw_post(gateway.key, CHAT))
    assert b'data: {"n": 0}' in gateway.read_until(connection, b'data: {"n": 0}')
    assert not backend.finished.is_set()  # the first piece came while the backend was still writing
    response = gateway.read_response(connection)
    assert response.body == b"".join(b'data: {"n": %d}\n\n' % n for n in range(5))


@pytest.mark.parametrize("raw_gateway", ["burst"], indirect=True)
def test_a_client_that_pauses_reading_still_gets_every_event_once_and_in_order(raw_gateway):
    gateway, _ = raw_gateway
    connection = ask_for_a_stream_then_stop_reading(gateway)
    gateway.run(1.5)  # the gateway queues what the backend sends, then stops reading it
    connection.read_everything()
    received = gateway.read_response(connection)  # a relay that never resumes times out here
    assert received.body == b"".join(BURST_EVENTS)


# -- the backend's response head --


@pytest.mark.parametrize("raw_gateway", ["padded-head", "endless-head"], indirect=True)
def test_a_backend_response_head_over_the_limit_gives_502_and_drops_the_backend_connection(raw_gateway):
    gateway, backend = raw_gateway  # 800 KB of header lines, or lines without end, against the default 64 KiB
    with gateway.http(gateway.key) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 502
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "upstream_error" and "65536 bytes" in error["message"]
    gateway.until(backend.dropped.is_set, 10, what="the gateway to drop its connection to the backend")


@pytest.fixture
def small_head_limit(tmp_path):
    backend = RawBackend("padded-head")
    env = {"GATEWAY_MAX_UPSTREAM_HEAD_BYTES": "8192"}
    with MemoryGateway.start(tmp_path, [Backend("raw", backend.url)], env=env) as gateway:
        yield gateway, backend
    backend.close()


def test_a_backend_response_head_is_measured_against_gateway_max_upstream_head_bytes(small_head_limit):
    gateway, backend = small_head_limit
    with gateway.http(gateway.key) as client:
        backend.padding = 7000
        under = client.post("/v1/chat/completions", json=CHAT)
        backend.padding = 9000
        over = client.post("/v1/chat/completions", json=CHAT)
    assert under.status_code == 200 and under.content == REPLY
    assert len(under.headers.get_list("x-pad")) == 7
    assert over.status_code == 502 and "8192 bytes" in over.json()["error"]["message"]
