"""Requests refused on their head, before their body (spec: "Authentication before the body",
GATEWAY_MAX_ADMIN_BODY_BYTES): a client that may not send a body gets its 401, 403, 413 or 429 at once,
then EOF, and the gateway keeps none of what it sends.

Each refusal's bytes, with the real key check, are pinned in memory (tests/test_server_protocol.py);
here the running gateway refuses a wrong key and a key at its rate limit, keeps its memory while
unauthenticated uploads are held open, and logs every refusal."""

from __future__ import annotations

import json
import threading

import pytest

from tests.support.chat import chat_body
from tests.support.front import (
    LIVENESS,
    assert_rejected,
    connect,
    max_rss_while,
    read_to_eof,
    request,
    response_or_none,
    rss_kib,
    send_all,
    wait_until_idle,
)
from tests.support.gateway import Backend, Gateway, raw_post
from tests.support.processes import wait_until

CHAT = chat_body("sim", max_tokens=2)
JUST_UNDER_32_MIB = 33554431  # within the relay's body limit: only the key can refuse it early
TEN_BYTES = b'{"name": "'
WRONG_KEY = "sk-" + "x" * 43
# How long a refusal on the head may take: it needs no body, so it comes at once; this is only the
# bound after which the test gives up rather than hang.
AT_ONCE = 3.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    with Gateway.start(
        tmp_path_factory.mktemp("gw-auth"), [Backend("sim", simulator.base_url)], env={"GATEWAY_BODY_TIMEOUT": "30"}
    ) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def limited_key(gateway):
    created = gateway.create_key("--name", "one-a-minute", "--rate-limit", "1/minute")
    # wait_for_key asks GET /v1/models, which is not rate-limited: only relayed requests count.
    gateway.wait_for_key(created["key"])
    return created["key"]


def use_up(gateway: Gateway, key: str) -> None:
    """Send complete requests with `key` until the gateway answers 429 (its limit is 1/minute)."""
    for _ in range(3):
        sock, reader = connect(gateway)
        with sock:
            sock.sendall(raw_post(key, CHAT))
            status, _, _ = reader.response()
        if status == 429:
            return
        assert status == 200
    raise AssertionError("a key limited to 1/minute was never refused")


def refused_on_the_head(gateway: Gateway, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a head (and maybe a little body), never the rest; the answer must come and then EOF."""
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(data)
        response = response_or_none(reader, AT_ONCE)
        assert response is not None, (
            "no answer to a head that can be refused as it stands: the gateway waits for the body"
        )
        closed = read_to_eof(sock, timeout=AT_ONCE, already=reader.buffer)
        assert closed == b"", f"bytes after the answer: {closed[:200]!r}"
        return response


# -- 401 --


def test_request_with_a_wrong_key_gets_401_before_its_body_and_then_eof(gateway):
    # Every kind of missing or bad key, on the relay and the admin API, is pinned in memory with the real
    # key check (tests/test_server_protocol.py); this is the same refusal from the running gateway.
    response = refused_on_the_head(
        gateway, request("POST", "/v1/chat/completions", WRONG_KEY, body=TEN_BYTES, content_length=JUST_UNDER_32_MIB)
    )
    assert_rejected(response, 401, "invalid_api_key", "invalid_request_error")


def test_twenty_unauthenticated_uploads_held_open_do_not_grow_the_gateway(gateway):
    pid = gateway.handle.pid
    wait_until_idle(pid)
    before = rss_kib(pid)
    pushed = [0] * 20
    ready: list[int] = []
    release = threading.Event()

    def upload(slot: int) -> None:
        try:
            with connect(gateway, timeout=3)[0] as sock:
                if send_all(sock, request("POST", "/admin/keys", body=TEN_BYTES, content_length=JUST_UNDER_32_MIB)):
                    for _ in range(32):  # up to 2 MB more of the declared 32 MiB, as fast as it is taken
                        if not send_all(sock, b"z" * 65536):
                            break
                        pushed[slot] += 65536
                ready.append(slot)
                release.wait(LIVENESS)  # held open while the gateway is measured
        except (TimeoutError, OSError):
            ready.append(slot)  # the gateway stopped taking the body: nothing more to push

    threads = [threading.Thread(target=upload, args=(slot,), daemon=True) for slot in range(20)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(ready) == 20, timeout=LIVENESS)
        wait_until_idle(pid)
        grown = max_rss_while(pid, 0.5) - before
    finally:
        release.set()
        for thread in threads:
            thread.join(LIVENESS)
    assert grown < 5 * 1024, (
        f"20 connections without a key grew the gateway by {grown / 1024:.1f} MB "
        f"(they got {sum(pushed) / 2**20:.1f} MB of body in)"
    )


# -- the admin API --


def test_admin_key_with_a_normal_body_still_creates_a_key(gateway):
    body = json.dumps({"name": "made-over-http"}).encode()
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(request("POST", "/admin/keys", gateway.admin_key, body=body))
        status, _, answer = reader.response()
    assert status == 201
    created = json.loads(answer)
    assert created["name"] == "made-over-http" and created["key"].startswith("sk-")


# -- 429 --


def test_key_at_its_rate_limit_gets_429_before_its_body_and_then_eof(gateway, limited_key):
    use_up(gateway, limited_key)
    response = refused_on_the_head(
        gateway, request("POST", "/v1/chat/completions", limited_key, body=TEN_BYTES, content_length=JUST_UNDER_32_MIB)
    )
    assert_rejected(response, 429, "rate_limit_exceeded", "rate_limit_error")
    assert int(response[1]["retry-after"]) > 0


# -- the log --


def test_refusals_on_the_head_appear_in_the_access_log(gateway, limited_key):
    use_up(gateway, limited_key)
    before = gateway.log_text()  # settled: earlier tests' lines are in
    heads = {
        401: request("POST", "/admin/keys", body=TEN_BYTES, content_length=JUST_UNDER_32_MIB),
        403: request("POST", "/admin/keys", gateway.key, body=TEN_BYTES, content_length=JUST_UNDER_32_MIB),
        413: request("POST", "/admin/keys", gateway.admin_key, content_length=70000),
        429: request("POST", "/v1/chat/completions", limited_key, body=TEN_BYTES, content_length=JUST_UNDER_32_MIB),
    }
    for data in heads.values():
        sock, reader = connect(gateway)
        with sock:
            sock.sendall(data)
            response_or_none(reader, AT_ONCE)

    def missing() -> list[int]:
        text = gateway.log_text(settle=0)
        return [status for status in heads if text.count(f"status={status}") <= before.count(f"status={status}")]

    try:
        wait_until(lambda: not missing(), timeout=5)
    except TimeoutError:
        pytest.fail(f"no access-log line for the refusals with status {missing()}")
