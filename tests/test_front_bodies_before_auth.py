"""Requests refused on their head, before their body (spec: "Authentication before the body",
GATEWAY_MAX_ADMIN_BODY_BYTES): a client that may not send a body gets its 401, 403, 413 or 429 at once,
then EOF, and the gateway keeps none of what it sends.

Each refusal's bytes, with the real key check, are pinned with a stand-in app (tests/test_server_protocol.py);
here the whole gateway, in the test's process (tests/support/memory_gateway.py), refuses a wrong key and a
key at its rate limit, keeps its memory while unauthenticated uploads are held open, and logs every refusal.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support.chat import chat_body
from tests.support.front import assert_rejected, request, rss_kib
from tests.support.gateway import Backend, raw_post
from tests.support.http_wire import WireResponse
from tests.support.memory_gateway import MemoryGateway

CHAT = chat_body("sim", max_tokens=2)
JUST_UNDER_32_MIB = 33554431  # within the relay's body limit: only the key can refuse it early
TEN_BYTES = b'{"name": "'
WRONG_KEY = "sk-" + "x" * 43
# How long a refusal on the head may take: it needs no body, so it comes at once; this is only the
# bound after which the test gives up rather than hang.
AT_ONCE = 3.0


@pytest.fixture(scope="module")
def memory_gateway(tmp_path_factory, simulator):
    with MemoryGateway.start(
        tmp_path_factory.mktemp("gw-auth"), [Backend("sim", simulator.base_url)], env={"GATEWAY_BODY_TIMEOUT": "30"}
    ) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def limited_key(memory_gateway):
    return memory_gateway.create_key("one-a-minute", rate_limit="1/minute")[1]


def parts(response: WireResponse) -> tuple[int, dict[str, str], bytes]:
    """A response as assert_rejected takes it."""
    return response.status, dict(response.headers), response.body


def use_up(gateway: MemoryGateway, key: str) -> None:
    """Send complete requests with `key` until the gateway answers 429 (its limit is 1/minute)."""
    for _ in range(3):
        status = gateway.exchange(raw_post(key, CHAT)).status
        if status == 429:
            return
        assert status == 200
    raise AssertionError("a key limited to 1/minute was never refused")


def refused_on_the_head(gateway: MemoryGateway, data: bytes) -> WireResponse:
    """Send a head (and maybe a little body), never the rest; the answer must come and then EOF."""
    connection = gateway.connect()
    connection.send(data)
    gateway.until(
        lambda: connection.ended,
        AT_ONCE,
        what="an answer to a head that can be refused as it stands, and EOF: the gateway waits for the body",
    )
    response = gateway.read_response(connection)
    assert connection.pending == b"" and connection.take() == b"", f"bytes after the answer: {connection.pending!r}"
    return response


# -- 401 --


def test_request_with_a_wrong_key_gets_401_before_its_body_and_then_eof(memory_gateway):
    # Every kind of missing or bad key, on the relay and the admin API, is pinned with a stand-in app and
    # the real key check (tests/test_server_protocol.py); this is the same refusal from the whole gateway.
    response = refused_on_the_head(
        memory_gateway,
        request("POST", "/v1/chat/completions", WRONG_KEY, body=TEN_BYTES, content_length=JUST_UNDER_32_MIB),
    )
    assert_rejected(parts(response), 401, "invalid_api_key", "invalid_request_error")


def test_twenty_unauthenticated_uploads_held_open_do_not_grow_the_gateway(memory_gateway):
    piece = b"z" * 65536
    memory_gateway.run(0.6)  # idle: the measurement is of the uploads, not of what was under way
    before = rss_kib(os.getpid())  # the test's process, which holds the gateway
    pushed = [0] * 20
    uploads = []
    for slot in range(20):
        connection = memory_gateway.connect()
        connection.send(request("POST", "/admin/keys", body=TEN_BYTES, content_length=JUST_UNDER_32_MIB))
        for _ in range(32):  # up to 2 MB more of the declared 32 MiB, as fast as it is taken
            # A socket's send fails once the gateway closed the connection, and blocks while it does not
            # read (what waits in its buffers is the kernel's): nothing more to push then.
            if connection.gone or connection.transport.inbox:
                break
            connection.send(piece)
            pushed[slot] += 65536
        uploads.append(connection)  # held open while the gateway is measured
    try:
        grown = memory_gateway.max_rss(0.5) - before
    finally:
        for connection in uploads:
            connection.disconnect()
    assert grown < 5 * 1024, (
        f"20 connections without a key grew the gateway by {grown / 1024:.1f} MB "
        f"(they got {sum(pushed) / 2**20:.1f} MB of body in)"
    )


# -- the admin API --


def test_admin_key_with_a_normal_body_still_creates_a_key(memory_gateway):
    body = json.dumps({"name": "made-over-http"}).encode()
    response = memory_gateway.exchange(request("POST", "/admin/keys", memory_gateway.admin_key, body=body))
    assert response.status == 201
    created = json.loads(response.body)
    assert created["name"] == "made-over-http" and created["key"].startswith("sk-")


# -- 429 --


def test_key_at_its_rate_limit_gets_429_before_its_body_and_then_eof(memory_gateway, limited_key):
    use_up(memory_gateway, limited_key)
    response = refused_on_the_head(
        memory_gateway,
        request("POST", "/v1/chat/completions", limited_key, body=TEN_BYTES, content_length=JUST_UNDER_32_MIB),
    )
    assert_rejected(parts(response), 429, "rate_limit_exceeded", "rate_limit_error")
    assert int(response.header("retry-after")) > 0


# -- the log --


def test_refusals_on_the_head_appear_in_the_access_log(memory_gateway, limited_key):
    use_up(memory_gateway, limited_key)
    before = memory_gateway.log_text()  # settled: earlier tests' lines are in
    heads = {
        401: request("POST", "/admin/keys", body=TEN_BYTES, content_length=JUST_UNDER_32_MIB),
        403: request("POST", "/admin/keys", memory_gateway.key, body=TEN_BYTES, content_length=JUST_UNDER_32_MIB),
        413: request("POST", "/admin/keys", memory_gateway.admin_key, content_length=70000),
        429: request("POST", "/v1/chat/completions", limited_key, body=TEN_BYTES, content_length=JUST_UNDER_32_MIB),
    }
    for data in heads.values():
        connection = memory_gateway.connect()
        connection.send(data)
        memory_gateway.until(lambda c=connection: c.ended, AT_ONCE, what="the answer to a head refused as it stands")

    def missing() -> list[int]:
        text = memory_gateway.log_text(settle=0)
        return [status for status in heads if text.count(f"status={status}") <= before.count(f"status={status}")]

    try:
        memory_gateway.poll(lambda: not missing(), timeout=5)
    except TimeoutError:
        pytest.fail(f"no access-log line for the refusals with status {missing()}")
