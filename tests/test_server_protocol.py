"""The gateway's HTTP/1.1 server decision by decision, in memory (tests/support/memory_server.py): request
bytes in, the exact bytes of the answers out, and what the server did with the connection (kept it,
ended its side and lingered, closed or aborted it, paused reading). Its timers run on the loop's clock
with timeouts of tens of milliseconds.

The relay and the application behind the server are the test's own (echo_relay answers `relayed: ` and
the body; plain_app answers the method and path), except where a decision is the gateway's: the key
checked with the head is the real access.check_head over a real key file. The same server with the
whole gateway behind it (its memory, the simulator seeing a disconnect, the access log's lines) is
tested in the test's process too (tests/support/memory_gateway.py: tests/test_front_*.py,
tests/test_gateway_http.py); what needs a real socket or process (a reset that would destroy an
answer, a client's kernel answering the half-close probe, uvicorn's shutdown) keeps a gateway process
there.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import pytest

from tests.support.memory_server import (
    RELAY_PATH,
    MemoryServer,
    Receive,
    Relay,
    Send,
    limits_with,
    stream_relay,
)
from vllm_gateway import access, errors
from vllm_gateway.keystore import KeyStore
from vllm_gateway.server.exchange import Exchange

HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
HEALTH_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n\r\nGET /health"
MODELS = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n"
MODELS_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 14\r\n\r\nGET /v1/models"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
GARBAGE = b"\x00\x01garbage\r\n\r\n"
H2C_UPGRADE = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
JUST_UNDER_32_MIB = 33554431  # within the relay's body limit: only the key can refuse it early
WRONG_KEY = "sk-" + "x" * 43

# The OpenAI-shaped bodies of the server's own refusals.
INVALID_METHOD = (
    b'{"error":{"message":"Invalid HTTP request: Invalid method encountered.",'
    b'"type":"invalid_request_error","param":null,"code":"invalid_http"}}'
)
REQUEST_LINE_OVER_8_KIB = (
    b'{"error":{"message":"The request line is longer than the limit of 8192 bytes.",'
    b'"type":"invalid_request_error","param":null,"code":"request_line_too_long"}}'
)
HEAD_OVER_64_KIB = (
    b'{"error":{"message":"The request head is too large: a head over 65536 bytes.",'
    b'"type":"invalid_request_error","param":null,"code":"request_header_too_large"}}'
)
OVER_100_HEADER_LINES = (
    b'{"error":{"message":"The request head is too large: more than 100 header lines.",'
    b'"type":"invalid_request_error","param":null,"code":"request_header_too_large"}}'
)
BODY_OVER_64_KIB = (
    b'{"error":{"message":"The request body is larger than the limit of 65536 bytes.",'
    b'"type":"invalid_request_error","param":null,"code":"body_too_large"}}'
)
BODY_OVER_32_MIB = (
    b'{"error":{"message":"The request body is larger than the limit of 33554432 bytes.",'
    b'"type":"invalid_request_error","param":null,"code":"body_too_large"}}'
)
INVALID_KEY = (
    b'{"error":{"message":"Incorrect or missing API key. Send it as \'Authorization: Bearer <key>\' or '
    b'\'?api_key=<key>\'.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}'
)
KEY_DISABLED = (
    b'{"error":{"message":"This API key is disabled.","type":"invalid_request_error","param":null,'
    b'"code":"invalid_api_key"}}'
)
ADMIN_REQUIRED = (
    b'{"error":{"message":"This endpoint needs an admin API key.","type":"permission_error","param":null,'
    b'"code":"admin_required"}}'
)


def timed_out(what: str, seconds: str) -> bytes:
    return (
        b'{"error":{"message":"The request %s did not arrive within %s s.",'
        b'"type":"invalid_request_error","param":null,"code":"request_timeout"}}' % (what.encode(), seconds.encode())
    )


def status_line(status: int) -> bytes:
    # The phrase as the runtime names it: Python 3.13 renamed some (413 "Content Too Large").
    return b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())


def refusal(status: int, error: bytes) -> bytes:
    """The whole answer by which the server refuses a request and ends the connection."""
    return (
        status_line(status)
        + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(error)
        + error
    )


def post(body: bytes, path: str = RELAY_PATH, headers: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST %s HTTP/%s\r\nHost: gw\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        version,
        len(body),
        headers,
        body,
    )


def relayed(body: bytes) -> bytes:
    """echo_relay's answer to `body`."""
    answer = b"relayed: " + body
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer)


def get_health(headers: list[bytes], target: bytes = b"/health") -> bytes:
    return b"\r\n".join([b"GET " + target + b" HTTP/1.1", b"Host: gw", *headers]) + b"\r\n\r\n"


STREAM_EVENTS = [b'data: {"n": 1}\n\n', b"data: [DONE]\n\n"]
STREAM_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b'10\r\ndata: {"n": 1}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n'
)


async def echo_or_stream(exchange: Exchange) -> None:
    """echo_relay's answer, or for the body `stream` STREAM_EVENTS as a stream (STREAM_ANSWER)."""
    body = await exchange.read_body()
    if body == b"stream":
        await stream_relay(STREAM_EVENTS)(exchange)  # which reads the body again, whole
    else:
        exchange.respond(200, [(b"content-type", b"text/plain")], b"relayed: " + body)


def held_relay(gate: asyncio.Event) -> Relay:
    """A relay that reads the body and answers it once `gate` is set (an answer that takes its time)."""

    async def relay(exchange: Exchange) -> None:
        body = await exchange.read_body()
        await gate.wait()
        exchange.respond(200, [], body)

    return relay


# -- keep-alive and the order of answers --


def test_one_connection_answers_relayed_and_app_requests_in_turn_and_stays_open():
    with MemoryServer() as server:
        client = server.connect()
        for number in range(3):
            client.send(post(b'{"n": %d}' % number))
            assert client.take() == relayed(b'{"n": %d}' % number)
            client.send(MODELS)
            assert client.take() == MODELS_ANSWER
        assert client.kept_alive


def test_pipelined_requests_are_answered_in_the_order_they_came_whatever_each_takes():
    async def relay(exchange: Exchange) -> None:
        body = await exchange.read_body()
        if body == b"stream":
            await stream_relay(STREAM_EVENTS)(exchange)  # which reads the body again, whole
            return
        await asyncio.sleep(int(body) / 1000)  # the first takes longest
        exchange.respond(200, [], body)

    with MemoryServer(relay=relay) as server:
        client = server.connect()
        client.send(post(b"30") + post(b"stream") + HEALTH + post(b"1") + post(b"0"))
        server.until(lambda: server.state.total_requests == 5)
        assert client.take() == (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n30"
            + STREAM_ANSWER
            + HEALTH_ANSWER
            + b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1"
            + b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n0"
        )
        assert client.kept_alive


def test_reading_pauses_while_four_requests_wait_their_turn_and_resumes_as_they_are_answered():
    gate = asyncio.Event()
    with MemoryServer(relay=held_relay(gate)) as server:
        client = server.connect()
        client.send(b"".join(post(b"%d" % n) for n in range(6)))  # one answered, five waiting
        assert client.transport.reading_paused
        client.send(post(b"6"))  # stays in the socket's buffer: the server does not read it yet
        assert client.transport.inbox and client.take() == b""
        gate.set()
        server.until(lambda: server.state.total_requests == 7)
        assert client.take() == b"".join(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n%d" % n for n in range(7))
        assert not client.transport.reading_paused and client.kept_alive


def test_answers_wait_while_the_client_reads_nothing_and_so_does_the_server():
    with MemoryServer() as server:
        client = server.connect()
        client.stop_reading(unread=1 << 20)
        client.send(HEALTH * 3)
        assert client.take() == b"", "answered into a buffer the client does not read"
        assert client.transport.reading_paused
        client.send(HEALTH)
        assert client.transport.inbox, "read requests whose answers could not be sent"
        client.read_everything()
        assert client.take() == HEALTH_ANSWER * 4
        assert not client.transport.reading_paused and client.kept_alive


# -- Expect: 100-continue --


def test_expect_100_continue_gets_continue_when_the_body_is_read_and_then_the_answer():
    with MemoryServer() as server:
        client = server.connect()
        head = post(b"hello", headers=b"Expect: 100-continue\r\n")[: -len(b"hello")]
        client.send(head)
        assert client.take() == CONTINUE
        client.send(b"hello")
        assert client.take() == relayed(b"hello")
        assert client.kept_alive


def test_expect_100_continue_with_a_body_declared_over_the_limit_gets_413_without_continue_then_the_end():
    with MemoryServer(limits_with(linger_bytes=100_000)) as server:
        client = server.connect()
        head = b"POST %s HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        client.send(head % (RELAY_PATH.encode(), 1 << 40))
        assert client.take() == refusal(413, BODY_OVER_32_MIB)
        assert client.transport.eof_written, "the server did not end its side after its 413"
        assert server.rejections == [("POST", RELAY_PATH, 413)]
        # Not a terabyte read and dropped: what still comes is dropped up to linger_bytes, then the end.
        client.send(b"z" * 99_000)
        assert not client.gone and client.take() == b""
        client.send(b"z" * 2_000)
        assert client.transport.aborted


# -- HTTP/1.0 --


def test_http_1_0_stream_is_sent_unframed_and_ends_with_the_connection():
    with MemoryServer(relay=stream_relay(STREAM_EVENTS)) as server:
        client = server.connect()
        client.send(post(b"{}", version=b"1.0"))
        server.until(lambda: client.gone)
        assert client.take() == (
            b'HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: {"n": 1}\n\n'
            b"data: [DONE]\n\n"
        )
        assert client.transport.closed and not client.transport.aborted


def test_http_1_0_request_gets_its_answer_and_then_the_close():
    with MemoryServer() as server:
        client = server.connect()
        client.send(b"GET /health HTTP/1.0\r\n\r\n")
        assert client.take() == (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 11\r\nconnection: close\r\n\r\nGET /health"
        )
        assert client.transport.closed


# -- bytes that are not HTTP --


def test_bytes_that_are_not_http_get_400_in_openai_shape_and_the_server_ends_the_connection():
    with MemoryServer() as server:
        client = server.connect()
        client.send(b"NOT HTTP AT ALL\r\n\r\n")
        assert client.take() == refusal(400, INVALID_METHOD)
        assert client.transport.eof_written and server.rejections == [("-", "-", 400)]
        client.send_eof()
        assert client.transport.closed and client.take() == b""


@pytest.mark.parametrize(
    "first, answer",
    [(HEALTH, HEALTH_ANSWER), (post(b"{}"), relayed(b"{}"))],
    ids=["health", "relayed"],
)
def test_complete_request_then_garbage_gets_its_answer_then_400_then_the_end(first, answer):
    with MemoryServer() as server:
        client = server.connect()
        client.send(first + GARBAGE)  # in one read
        assert client.take() == answer + refusal(400, INVALID_METHOD)
        assert client.transport.eof_written and server.rejections == [("-", "-", 400)]
        client.send_eof()
        assert client.transport.closed and client.take() == b""


# -- heads over the limits (GATEWAY_MAX_REQUEST_LINE_BYTES 8192, GATEWAY_MAX_HEAD_BYTES 65536,
# GATEWAY_MAX_HEADERS 100) --


def test_request_line_of_9_kib_gets_414_and_the_server_ends_the_connection():
    with MemoryServer() as server:
        client = server.connect()
        client.send(get_health([], target=b"/health?pad=" + b"a" * 9 * 1024))
        assert client.take() == refusal(414, REQUEST_LINE_OVER_8_KIB)
        assert client.transport.eof_written and server.rejections == [("-", "-", 414)]


def test_request_line_just_under_the_limit_is_served():
    with MemoryServer() as server:
        client = server.connect()
        client.send(get_health([], target=b"/health?pad=" + b"a" * (8192 - 200)))
        assert client.take() == HEALTH_ANSWER and client.kept_alive


def test_header_value_of_70_kib_gets_431():
    with MemoryServer() as server:
        client = server.connect()
        client.send(get_health([b"X-Big: " + b"b" * 70 * 1024]))
        assert client.take() == refusal(431, HEAD_OVER_64_KIB)
        assert client.transport.eof_written and server.rejections == [("-", "-", 431)]


def test_101_header_lines_get_431():
    with MemoryServer() as server:
        client = server.connect()
        client.send(get_health([b"X-Header-%d: %d" % (i, i) for i in range(100)]))  # and Host: 101
        assert client.take() == refusal(431, OVER_100_HEADER_LINES)


def test_exactly_100_header_lines_are_served():
    with MemoryServer() as server:
        client = server.connect()
        client.send(get_health([b"X-Header-%d: %d" % (i, i) for i in range(99)]))  # and Host: 100
        assert client.take() == HEALTH_ANSWER and client.kept_alive


def test_header_value_sent_in_pieces_is_cut_off_with_431_within_three_heads_worth():
    with MemoryServer() as server:
        client = server.connect()
        client.send(b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Huge: ")
        sent = 0
        while not client.transport.written and sent < 10 * 1024 * 1024:
            client.send(b"v" * 65536)
            sent += 65536
        assert client.take() == refusal(431, HEAD_OVER_64_KIB)
        assert sent <= 3 * 65536, f"read {sent} bytes of one header before refusing it"


# -- the clocks: GATEWAY_HEAD_TIMEOUT, GATEWAY_BODY_TIMEOUT, GATEWAY_KEEPALIVE_TIMEOUT --


def test_connection_that_sends_nothing_is_closed_after_the_head_timeout_without_a_byte():
    with MemoryServer(limits_with(head_timeout=0.05)) as server:
        opened = server.now()
        client = server.connect()
        assert server.until(lambda: client.gone) - opened >= 0.05
        assert client.take() == b"" and client.transport.closed and server.rejections == []


def test_head_trickled_byte_by_byte_gets_408_after_the_head_timeout():
    with MemoryServer(limits_with(head_timeout=0.1)) as server:
        opened = server.now()
        client = server.connect()
        for byte in HEALTH:  # 0.02 s a byte: about 0.7 s for the whole head
            client.send(bytes([byte]))
            if client.ended:
                break
            server.run(0.02)
        assert server.now() - opened >= 0.1
        assert client.take() == refusal(408, timed_out("head", "0.1"))
        assert client.ended and server.rejections == [("-", "-", 408)]


def test_next_head_started_and_stalled_on_a_kept_connection_gets_408():
    with MemoryServer(limits_with(head_timeout=0.05)) as server:
        client = server.connect()
        client.send(HEALTH)
        assert client.take() == HEALTH_ANSWER
        started = server.now()  # before the head's first bytes: its clock starts with them
        client.send(b"GET /health HTTP/1.1\r\nHost: gw\r\n")  # and the blank line never comes
        assert server.until(lambda: client.ended) - started >= 0.05
        assert client.take() == refusal(408, timed_out("head", "0.05"))


@pytest.mark.parametrize("path", [RELAY_PATH, "/admin/keys"], ids=["relayed", "app"])
def test_declared_body_that_never_arrives_gets_408_after_the_body_timeout(path):
    with MemoryServer(limits_with(body_timeout=0.05)) as server:
        client = server.connect()
        client.send(post(b'{"model": ', path=path)[: -len(b'{"model": ')].replace(b"Length: 10", b"Length: 1000"))
        started = server.now()  # before the body's last bytes: the clock counts from them
        client.send(b'{"model": ')
        assert server.until(lambda: client.ended) - started >= 0.05
        assert client.take() == refusal(408, timed_out("body", "0.05"))
        assert server.rejections == ([] if path == RELAY_PATH else [("POST", path, 408)])


def test_body_sent_with_pauses_shorter_than_the_body_timeout_is_served():
    body = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}'
    with MemoryServer(limits_with(body_timeout=0.25)) as server:
        client = server.connect()
        client.send(post(body)[: -len(body)])
        for start in range(0, len(body), 8):  # 8 bytes every 0.05 s: slow, never idle for the timeout
            server.run(0.05)
            client.send(body[start : start + 8])
        assert client.take() == relayed(body) and client.kept_alive


def test_idle_connection_is_closed_after_the_keep_alive_timeout_without_a_byte():
    with MemoryServer(limits_with(keepalive_timeout=0.1)) as server:
        client = server.connect()
        asked = server.now()  # before the answer: the keep-alive clock starts with it
        client.send(post(b"{}"))
        assert client.take() == relayed(b"{}")
        assert server.until(lambda: client.gone) - asked >= 0.1
        assert client.take() == b"" and client.transport.closed


def test_keep_alive_connection_stays_open_past_the_head_timeout_until_the_keep_alive_timeout():
    with MemoryServer(limits_with(head_timeout=0.05, keepalive_timeout=0.2)) as server:
        client = server.connect()
        asked = server.now()
        client.send(HEALTH)
        assert client.take() == HEALTH_ANSWER
        assert (
            server.until(lambda: client.gone) - asked >= 0.2
        )  # not at the head timeout: an idle kept connection waits longer
        assert client.take() == b""


def test_the_keep_alive_timeout_counts_from_the_last_answer_not_the_first():
    with MemoryServer(limits_with(keepalive_timeout=0.4)) as server:
        client = server.connect()
        # Requests 0.25 s apart with a 0.4 s keep-alive: the third comes after the first answer's deadline.
        for number in range(3):
            if number:
                server.run(0.25)
            asked = server.now()
            client.send(post(b"%d" % number))
            assert client.take() == relayed(b"%d" % number), f"request {number + 1}"
        assert server.until(lambda: client.gone) - asked >= 0.4


def test_a_request_still_arriving_past_the_keep_alive_timeout_is_not_an_idle_connection():
    with MemoryServer(limits_with(keepalive_timeout=0.1)) as server:
        client = server.connect()
        request = post(b"{}")
        client.send(request[:20])
        server.run(0.25)
        client.send(request[20:])
        assert client.take() == relayed(b"{}")


# -- the clock of answers: GATEWAY_SEND_TIMEOUT --


def endless_stream(cancelled: list[bool]) -> Relay:
    async def relay(exchange: Exchange) -> None:
        await exchange.read_body()
        exchange.start(200, [(b"content-type", b"text/event-stream")])
        try:
            while True:
                exchange.write(b"data: x\n\n")
                await exchange.drain()  # waits while the client reads nothing
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    return relay


def test_client_that_reads_none_of_its_answer_for_the_send_timeout_is_dropped_and_the_relay_stopped():
    cancelled: list[bool] = []
    with MemoryServer(limits_with(send_timeout=0.05), relay=endless_stream(cancelled)) as server:
        client = server.connect()
        client.send(post(b"{}"))
        paused = server.now()
        client.stop_reading(unread=1 << 20)
        assert server.until(lambda: client.transport.aborted) - paused >= 0.05
        assert cancelled == [True], "the relay (and with it the generation upstream) went on"


def test_client_that_reads_its_answer_slowly_is_not_dropped():
    cancelled: list[bool] = []
    with MemoryServer(limits_with(send_timeout=0.2), relay=endless_stream(cancelled)) as server:
        client = server.connect()
        client.send(post(b"{}"))
        client.stop_reading(unread=1 << 20)
        for _ in range(25):  # 0.5 s, a little read every 0.02 s
            server.run(0.02)
            client.read_some(1000)
        assert not client.gone and cancelled == []
        client.read_everything()
        assert not client.gone and client.take().startswith(b"HTTP/1.1 200 OK\r\n")


# -- keys checked with the head, before any body (access.check_head over a real key file) --


@dataclass
class Keys:
    store: KeyStore
    admin: str
    user: str
    disabled: str


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """A real key file with an admin key, a user key and a disabled one."""
    store = KeyStore(tmp_path / "keys.json")
    _, admin = store.create("admin", admin=True)
    _, user = store.create("user")
    record, disabled = store.create("disabled")
    store.update(record.id, {"disabled": True})
    return Keys(store, admin, user, disabled)


def keyed_server(keys: Keys) -> MemoryServer:
    """A server that checks each head's key as the gateway does (access.check_head)."""
    return MemoryServer(check=functools.partial(access.check_head, keys.store))


def declared_post(path: str, key: str | None, declared: int, sent: bytes) -> bytes:
    """A POST with `key` (if any) whose head declares `declared` bytes of body, of which `sent` follow."""
    authorization = b"" if key is None else b"Authorization: Bearer %s\r\n" % key.encode()
    head = b"POST %s HTTP/1.1\r\nHost: gw\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % (path.encode(), authorization, declared) + sent


@pytest.mark.parametrize("path", ["/admin/keys", RELAY_PATH])
@pytest.mark.parametrize("which", ["no key", "wrong key", "disabled key"])
def test_request_without_a_valid_key_gets_401_before_its_body_then_the_server_ends_the_connection(keys, path, which):
    key = {"no key": None, "wrong key": WRONG_KEY, "disabled key": keys.disabled}[which]
    with keyed_server(keys) as server:
        client = server.connect()
        client.send(declared_post(path, key, JUST_UNDER_32_MIB, b'{"name": "'))
        assert client.take() == refusal(401, KEY_DISABLED if which == "disabled key" else INVALID_KEY)
        assert client.transport.eof_written, "the server waits for a body it will not use"
        client.send(b"z" * 65536)  # the rest of the body is read and dropped, never kept
        assert client.take() == b"" and client.protocol.discarded == 65536
        assert server.rejections == [("POST", path, 401)]


def test_user_key_on_admin_keys_gets_403_before_its_body(keys):
    with keyed_server(keys) as server:
        client = server.connect()
        client.send(declared_post("/admin/keys", keys.user, JUST_UNDER_32_MIB, b'{"name": "'))
        assert client.take() == refusal(403, ADMIN_REQUIRED)
        assert client.transport.eof_written and server.rejections == [("POST", "/admin/keys", 403)]


def test_admin_key_declaring_70000_bytes_on_admin_keys_gets_413_before_its_body(keys):
    with keyed_server(keys) as server:
        client = server.connect()
        client.send(declared_post("/admin/keys", keys.admin, 70000, b""))
        assert client.take() == refusal(413, BODY_OVER_64_KIB)
        assert client.transport.eof_written and server.rejections == [("POST", "/admin/keys", 413)]


def test_nothing_sent_after_a_refused_request_is_answered(keys):
    with keyed_server(keys) as server:
        client = server.connect()
        # The refused request's body, then a whole request: the connection is ending, so the second is
        # read and dropped, never served.
        client.send(declared_post(RELAY_PATH, WRONG_KEY, 10, b"{}" * 5) + HEALTH)
        assert client.take() == refusal(401, INVALID_KEY)
        client.send(HEALTH, eof=True)
        assert client.transport.closed and client.take() == b""


def test_an_answer_the_relay_gives_before_reading_the_body_ends_the_connection():
    async def refuse_unread(exchange: Exchange) -> None:  # as the relay answers a key at its rate limit
        exchange.respond_error(errors.rate_limited("1/minute", 60, []))

    with MemoryServer(relay=refuse_unread) as server:
        client = server.connect()
        client.send(declared_post(RELAY_PATH, None, JUST_UNDER_32_MIB, b'{"name": "'))
        assert client.take() == (
            status_line(429)
            + b"content-type: application/json\r\nretry-after: 60\r\ncontent-length: 158\r\nconnection: close\r\n\r\n"
            b'{"error":{"message":"Rate limit reached for this API key (1/minute). Try again in 60 s.",'
            b'"type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}'
        )
        assert client.transport.eof_written
        client.send(b"z" * 65536)
        assert client.take() == b"" and client.protocol.discarded == 65536


# -- the lingering close: GATEWAY_LINGER_BYTES, GATEWAY_LINGER_TIMEOUT --


def test_lingering_ends_after_linger_bytes():
    with MemoryServer(limits_with(linger_bytes=100_000)) as server:
        client = server.connect()
        client.send(get_health([b"X-%d: y" % i for i in range(101)]))
        assert client.take() == refusal(431, OVER_100_HEADER_LINES)
        client.send(b"z" * 100_000)  # read and dropped: the client reads its 431 meanwhile
        assert not client.gone
        client.send(b"z")
        assert client.transport.aborted and client.protocol.discarded == 100_001


def test_lingering_ends_after_linger_timeout():
    with MemoryServer(limits_with(linger_timeout=0.1)) as server:
        client = server.connect()
        asked = server.now()
        client.send(get_health([b"X-%d: y" % i for i in range(101)]))
        assert client.take() == refusal(431, OVER_100_HEADER_LINES)
        while not client.gone:  # a trickle that keeps the connection busy, far below the byte bound
            client.send(b"z")
            server.run(0.01)
            assert server.now() - asked < 5, "still lingering after 5 s"
        assert server.now() - asked >= 0.1 and client.transport.aborted


# -- half-closes, and a client that leaves --


@pytest.mark.parametrize(
    "requests, answers",
    [
        (HEALTH, HEALTH_ANSWER),
        (post(b"{}"), relayed(b"{}")),
        (post(b"stream"), STREAM_ANSWER),
        (HEALTH + post(b"{}") + post(b"stream"), HEALTH_ANSWER + relayed(b"{}") + STREAM_ANSWER),
    ],
    ids=["health", "relayed", "relayed stream", "three pipelined"],
)
def test_client_that_half_closes_after_its_requests_gets_every_answer_then_the_close(requests, answers):
    with MemoryServer(relay=echo_or_stream) as server:
        client = server.connect()
        client.send(requests, eof=True)
        server.until(lambda: client.gone)
        assert client.take() == answers
        assert client.transport.closed and not client.transport.aborted


def test_client_that_half_closes_while_its_answer_takes_time_is_probed_with_100_continue_then_answered():
    # An interim 100 Continue, which every HTTP/1.1 client skips, tells a half-close from a close: a
    # closed socket would answer it with a reset (the real socket's side: tests/test_front_lost_answers.py).
    gate = asyncio.Event()
    with MemoryServer(relay=held_relay(gate)) as server:
        client = server.connect()
        client.send(post(b"1"), eof=True)
        server.until(lambda: bytes(client.transport.written) == CONTINUE)
        gate.set()
        server.until(lambda: client.gone)
        assert client.take() == CONTINUE + b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1"
        assert client.transport.closed and not client.transport.aborted


def test_client_that_leaves_during_a_relayed_answer_stops_the_relay():
    cancelled: list[bool] = []
    with MemoryServer(relay=endless_stream(cancelled)) as server:
        client = server.connect()
        client.send(post(b"{}"))
        client.disconnect()
        assert cancelled == [True]


# -- the application behind the server (server/asgi_bridge.py) --


def test_an_app_answer_sent_in_pieces_goes_out_chunked_and_the_connection_stays():
    async def app(scope: dict[str, object], receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for piece in (b"one ", b"two"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with MemoryServer(app=app) as server:
        client = server.connect()
        client.send(HEALTH)
        assert client.take() == (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
            b"4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n"
        )
        assert client.kept_alive


def test_an_app_waiting_for_more_of_the_request_learns_that_its_client_left():
    received: list[dict[str, object]] = []

    async def app(scope: dict[str, object], receive: Receive, send: Send) -> None:
        received.append(await receive())
        received.append(await receive())  # nothing more comes: it waits for the client to leave

    with MemoryServer(app=app) as server:
        client = server.connect()
        client.send(HEALTH)
        assert received == [{"type": "http.request", "body": b"", "more_body": False}]
        client.disconnect()
        assert received[1:] == [{"type": "http.disconnect"}]


# -- curl --http2 on http:// --


def test_h2c_upgrade_post_is_served_as_http_1_1_with_its_body_and_the_connection_goes_on():
    with MemoryServer() as server:
        client = server.connect()
        body = b'{"model": "sim", "max_tokens": 3}'
        client.send(post(body, headers=H2C_UPGRADE))
        assert client.take() == relayed(body)
        client.send(post(b"next"))
        assert client.take() == relayed(b"next") and client.kept_alive


# -- shutdown and the connection cap --


def test_shutdown_closes_an_idle_connection_at_once_and_a_busy_one_after_its_answer():
    gate = asyncio.Event()
    with MemoryServer(relay=held_relay(gate)) as server:
        idle, busy = server.connect(), server.connect()
        busy.send(post(b"1"))
        for connection in (idle, busy):
            connection.protocol.shutdown()
        server.settle()
        assert idle.transport.closed and not busy.gone
        gate.set()
        server.until(lambda: busy.gone)
        assert busy.take() == b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n1"


def test_connection_beyond_the_cap_is_closed_at_once_and_a_place_freed_is_taken_again():
    with MemoryServer(max_connections=2) as server:
        first, second = server.connect(), server.connect()
        extra = server.connect()
        assert extra.transport.aborted and not first.gone and not second.gone
        extra.send(HEALTH)
        assert extra.take() == b""
        first.disconnect()
        again = server.connect()
        again.send(HEALTH)
        assert again.take() == HEALTH_ANSWER
