"""The request log: one line per request with the facts an operator needs, and never a key. The gateway
runs in the test's process (tests/support/memory_gateway.py), but where its own output is read too."""

from __future__ import annotations

import re

from tests.support.chat import chat_body
from tests.support.gateway import Backend, raw_post
from tests.support.memory_gateway import MemoryGateway


def test_each_request_is_one_line_with_key_model_backend_status_and_tokens(memory_gateway):
    gateway = memory_gateway
    whole = chat_body("sim", messages=[{"role": "user", "content": "a b c d"}], max_tokens=6)
    stream = chat_body(
        "sim",
        messages=[{"role": "user", "content": "a b"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert gateway.exchange(raw_post(gateway.key, whole, extra="X-Request-ID: log-check-1\r\n")).status == 200
    assert gateway.exchange(raw_post(gateway.key, stream, extra="X-Request-ID: log-check-2\r\n")).status == 200
    lines = gateway.log_text().splitlines()
    first = [line for line in lines if "rid=log-check-1 " in line]
    second = [line for line in lines if "rid=log-check-2 " in line]
    assert len(first) == 1 and len(second) == 1
    assert re.search(
        r"POST /v1/chat/completions status=200 duration_ms=[\d.]+ key=key_\w+\(test-user\) "
        r"model=sim backend=sim prompt_tokens=4 completion_tokens=6$",
        first[0],
    )
    assert second[0].endswith("prompt_tokens=2 completion_tokens=4")


def test_no_key_appears_in_any_log_even_when_sent_in_the_url(gateway):
    with gateway.http() as client:
        client.post(
            "/v1/chat/completions",
            params={"api_key": gateway.key},
            json={"model": "sim", "messages": [], "max_tokens": 1},
        )
        client.get("/v1/models", params={"api_key": gateway.admin_key})
        client.get("/v1/models", params={"api_key": "sk-wrong-key-in-url"})
    text = gateway.log_text() + (gateway.workdir / "gateway.stdout.log").read_text()
    for secret in (gateway.key, gateway.admin_key, "sk-wrong-key-in-url"):
        assert secret not in text
    assert "api_key" not in text


def test_log_lines_cannot_be_forged_through_the_model_name(memory_gateway):
    with memory_gateway.http(memory_gateway.key) as client:
        client.post("/v1/chat/completions", json={"model": "x\n2026-01-01 INFO forged line", "messages": []})
    lines = memory_gateway.log_text().splitlines()
    assert any("forged line" in line for line in lines)  # logged, on the request's own line
    assert not any(line.startswith("2026-01-01 INFO forged") for line in lines)


def test_log_rotates_at_its_size_limit_and_keeps_writing(tmp_path, simulator):
    env = {"GATEWAY_LOG_MAX_BYTES": "2000", "GATEWAY_LOG_BACKUPS": "2"}
    with MemoryGateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        with gateway.http(gateway.key) as client:
            for index in range(40):
                client.post(
                    "/v1/chat/completions",
                    json={"model": "sim", "messages": [], "max_tokens": 1},
                    headers={"X-Request-ID": f"rot-{index}"},
                )
        text = gateway.log_text()
    rotated = tmp_path / "logs" / "vllm_api_server.log.1"
    assert rotated.exists()
    assert "rid=rot-39 " in text
