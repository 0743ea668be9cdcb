"""How the relay frames what it passes on: every framing a backend may use (chunked, Content-Length,
to the close), streamed and not, with the usage chunk kept from the client or not, reaches an HTTP/1.1
client (whose kept-alive connection then serves another request) and an HTTP/1.0 client whole and
validly framed. The gateway never declares a length it will not send.

A raw socket server stands in for vLLM, because vLLM itself only answers chunked streams and
Content-Length JSON; nginx serving a file, or any server that knows the length, sends an event stream
with a Content-Length.
"""

from __future__ import annotations

import gzip
import json
import socket
import time

import pytest

from tests.support.gateway import Backend, raw_post
from tests.support.http_wire import take_response
from tests.support.memory_gateway import MemoryGateway
from tests.support.raw_backend import ThreadedBackend

MODELS = b'{"object":"list","data":[{"id":"raw","object":"model"}]}'
ROLE = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
# Enough events that the body is far longer than one read of the gateway (16 KB, as curl first got).
TOKENS = [
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%d %s"}}]}\n\n'
    % (n, b"x" * 200)
    for n in range(150)
]
USAGE = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":150,"total_tokens":153}}\n\n'
)
DONE = b"data: [DONE]\n\n"
EVENTS = ROLE + b"".join(TOKENS) + USAGE + DONE
WITHOUT_USAGE = ROLE + b"".join(TOKENS) + DONE
REPLY = (
    b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"'
    + b"y" * 20000
    + b'"}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
)
LIVENESS = 10.0
LATE_END = 1.5


class FramingBackend(ThreadedBackend):
    """Answers a chat request with the framing its first message names: `chunked`, `length` (a
    Content-Length), `close` (the body ends with the connection), `gzip` (Content-Encoding: gzip,
    with a Content-Length) or `late-end` (chunked, its end sent LATE_END seconds after the rest). A
    stream (`"stream": true`) is EVENTS, usage chunk included, as vLLM sends it when asked for the
    usage (the gateway always asks); otherwise REPLY. Each body goes in three pieces a little apart,
    so the gateway relays it as it comes rather than all at once."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        super().__init__()

    def connection(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                body, buffer = buffer[:length], buffer[length:]
                path = head.split(b" ")[1]
                if path in (b"/health", b"/v1/models"):
                    answer = MODELS if path == b"/v1/models" else b""
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
                    continue
                self.heads.append(head)
                if not self._answer(conn, json.loads(body)):
                    return

    def _answer(self, conn: socket.socket, payload: dict) -> bool:
        """Send one answer; False when the connection must close after it."""
        framing = payload["messages"][0]["content"]
        stream = payload.get("stream") is True
        body = EVENTS if stream else REPLY
        kind = b"text/event-stream" if stream else b"application/json"
        head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n" % kind
        if framing == "gzip":
            body = gzip.compress(body)
            head += b"Content-Encoding: gzip\r\n"
        third = len(body) // 3
        pieces = [body[:third], body[third : 2 * third], body[2 * third :]]
        if framing in ("chunked", "late-end"):
            conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
            pieces = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces] + [b"0\r\n\r\n"]
            if framing == "late-end":
                for piece in pieces[:-1]:
                    conn.sendall(piece)
                time.sleep(LATE_END)
                pieces = pieces[-1:]
        elif framing == "close":
            conn.sendall(head + b"Connection: close\r\n\r\n")
        else:
            conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        for piece in pieces:
            time.sleep(0.03)
            conn.sendall(piece)
        return framing != "close"


@pytest.fixture(scope="module")
def framing(tmp_path_factory):
    backend = FramingBackend()
    with MemoryGateway.start(tmp_path_factory.mktemp("gw-framing"), [Backend("raw", backend.url)]) as gateway:
        yield gateway, backend
    backend.close()


def chat(framing: str, kind: str) -> dict:
    """A chat request to the framing backend. `kind`: `stream` (the usage chunk not asked for, so the
    gateway keeps it from the client), `stream-with-usage` (asked for: the body passes unchanged), `json`."""
    body: dict = {"model": "raw", "messages": [{"role": "user", "content": framing}]}
    if kind != "json":
        body["stream"] = True
    if kind == "stream-with-usage":
        body["stream_options"] = {"include_usage": True}
    return body


def expected_body(kind: str) -> bytes:
    return {"stream": WITHOUT_USAGE, "stream-with-usage": EVENTS, "json": REPLY}[kind]


@pytest.mark.parametrize("kind", ["stream", "stream-with-usage", "json"])
@pytest.mark.parametrize("upstream_framing", ["chunked", "length", "close"])
def test_an_http11_client_gets_the_whole_body_validly_framed_and_its_connection_serves_the_next_request(
    framing, upstream_framing, kind
):
    gateway, _ = framing
    connection = gateway.connect()
    connection.send(raw_post(gateway.key, chat(upstream_framing, kind)))
    first = gateway.read_response(connection)
    assert first.status == 200
    assert first.body == expected_body(kind)
    assert connection.pending == b"", f"bytes after the first answer: {connection.pending[:200]!r}"
    # The same connection: the next answer starts where the first one said it ended.
    connection.send(raw_post(gateway.key, chat("chunked", "json")))
    second = gateway.read_response(connection)
    assert second.status == 200 and second.body == REPLY
    assert connection.pending == b""


@pytest.mark.parametrize("kind", ["stream", "stream-with-usage", "json"])
@pytest.mark.parametrize("upstream_framing", ["chunked", "length", "close"])
def test_an_http10_client_gets_the_whole_body_without_chunked_framing(framing, upstream_framing, kind):
    gateway, _ = framing
    connection = gateway.connect()
    connection.send(raw_post(gateway.key, chat(upstream_framing, kind), version="1.0"))
    received = gateway.read_to_end(connection)
    response, used = take_response(received, eof=True)
    assert response is not None and used == len(received), f"bytes after the answer: {received[used:][:200]!r}"
    assert response.status == 200
    assert response.header("transfer-encoding") is None, "chunked framing sent to an HTTP/1.0 client"
    assert response.body == expected_body(kind)


@pytest.mark.parametrize("kind", ["stream", "json"])
def test_a_backend_that_compresses_anyway_has_its_body_relayed_unchanged_with_its_length(framing, kind):
    # The gateway asks for identity; a backend that compresses all the same gets its body through as
    # it sent it: the gateway cannot read it, so it neither removes the usage chunk nor re-frames it.
    gateway, _ = framing
    connection = gateway.connect()
    connection.send(raw_post(gateway.key, chat("gzip", kind)))
    response = gateway.read_response(connection)
    rest = connection.pending
    connection.send(raw_post(gateway.key, chat("chunked", "json")))
    second = gateway.read_response(connection)
    assert response.status == 200 and rest == b""
    assert response.header("content-encoding") == "gzip"
    assert response.header("content-length") == str(len(response.body))
    assert gzip.decompress(response.body) == (EVENTS if kind == "stream" else REPLY)
    assert second.status == 200 and second.body == REPLY


def test_the_gateway_asks_the_backend_for_an_unencoded_body_whatever_the_client_accepts(framing):
    gateway, backend = framing
    response = gateway.exchange(raw_post(gateway.key, chat("chunked", "json"), extra="Accept-Encoding: gzip, br\r\n"))
    assert response.status == 200 and response.header("content-encoding") is None
    head = backend.heads[-1].lower()
    assert b"\r\naccept-encoding: identity" in head
    assert b"gzip" not in head


@pytest.mark.parametrize("kind", ["stream", "stream-with-usage", "json"])
def test_an_answers_tokens_count_before_its_client_can_take_it_for_whole(framing, kind):
    # A client may take a stream for whole at `data: [DONE]` (the openai SDK stops reading there) and a
    # body at its last byte, and send its next request then. The backend ends this body LATE_END
    # seconds after its last event: had [DONE] gone on at once, the next request would have found the
    # first's 153 tokens (or a body's 7) uncounted.
    gateway, _ = framing
    _, key = gateway.create_key(f"late-end-{kind}", token_limit="1000/hour")
    connection = gateway.connect()
    connection.send(raw_post(key, chat("late-end", kind)))
    if kind == "json":
        answer = gateway.read_response(connection)
        used = json.loads(answer.body)["usage"]["total_tokens"]
        headers = answer.header
    else:
        received = gateway.read_until(connection, DONE)
        head, _ = take_response(received[: received.index(b"\r\n\r\n") + 4], eof=False, head_only=True)
        assert head is not None
        headers = head.header
        assert (USAGE in received) == (kind == "stream-with-usage")
        used = 153
    assert headers("x-ratelimit-remaining-tokens") == "1000"
    following = gateway.exchange(raw_post(key, chat("chunked", "json")))
    assert following.header("x-ratelimit-remaining-tokens") == str(1000 - used)
