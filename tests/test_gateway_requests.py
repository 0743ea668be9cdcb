"""Raw HTTP edge cases: what a careless or hostile client sends, and the error it gets back. The gateway
runs in the test's process (tests/support/memory_gateway.py) in front of a simulator process."""

from __future__ import annotations

from tests.support.chat import CHAT_BYTES
from tests.support.gateway import Backend
from tests.support.memory_gateway import MemoryGateway


def test_bad_json_is_400_invalid_json(memory_gateway):
    with memory_gateway.http(memory_gateway.key) as client:
        response = client.post(
            "/v1/chat/completions", content=b'{"model": "sim",', headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_body_that_is_not_an_object_is_400(memory_gateway):
    with memory_gateway.http(memory_gateway.key) as client:
        assert client.post("/v1/completions", json=["sim"]).status_code == 400


def test_missing_model_is_400_naming_the_param(memory_gateway):
    with memory_gateway.http(memory_gateway.key) as client:
        response = client.post("/v1/chat/completions", json={"messages": []})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_huge_body_is_413_without_reaching_the_backend(tmp_path, simulator):
    with MemoryGateway.start(
        tmp_path, [Backend("sim", simulator.base_url)], env={"GATEWAY_MAX_BODY_BYTES": "4096"}
    ) as gateway:
        with gateway.http(gateway.key) as client:
            declared = client.post("/v1/completions", json={"model": "sim", "prompt": "x" * 10_000})

            def chunked():
                yield b'{"model": "sim", "prompt": "'
                for _ in range(10):
                    yield b"y" * 1000
                yield b'"}'

            streamed = client.post("/v1/completions", content=chunked())
    assert declared.status_code == 413 and streamed.status_code == 413
    assert declared.json()["error"]["code"] == "body_too_large"
    assert simulator.stats()["requests"].get("/v1/completions", 0) == 0


def test_unknown_endpoint_is_404_in_openai_shape(memory_gateway):
    with memory_gateway.http(memory_gateway.key) as client:
        response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_tokenize_and_detokenize_are_routed_by_model(memory_gateway, simulator):
    with memory_gateway.http(memory_gateway.key) as client:
        tokens = client.post("/tokenize", json={"model": "sim", "prompt": "a b c"})
        text = client.post("/detokenize", json={"model": "sim", "tokens": tokens.json()["tokens"]})
    assert tokens.status_code == 200 and text.status_code == 200
    assert simulator.stats()["requests"]["/detokenize"] == 1


def test_audio_transcription_multipart_is_routed_by_its_model_field(memory_gateway, simulator):
    with memory_gateway.http(memory_gateway.key) as client:
        response = client.post(
            "/v1/audio/transcriptions",
            data={"model": "sim-alias", "language": "en"},
            files={"file": ("clip.wav", b"RIFF....WAVEfmt " + bytes(200), "audio/wav")},
        )
    assert response.status_code == 200, response.text
    assert "text" in response.json()
    forwarded = simulator.stats()["last_request"]
    assert forwarded["headers"]["content-type"].startswith("multipart/form-data; boundary=")


def test_injected_header_lines_do_not_reach_the_backend(memory_gateway, simulator):
    # Only an allow-list of headers travels upstream, and a request id must look like one.
    body = CHAT_BYTES
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {memory_gateway.key}\r\nContent-Type: application/json\r\n"
        "X-Request-ID: abc%0d%0aX-Injected: 1\r\nX-Forwarded-For: 6.6.6.6\r\nCookie: session=1\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    reply = memory_gateway.exchange(head.encode() + body)
    assert reply.status == 200
    headers = simulator.stats()["last_request"]["headers"]
    assert not {"x-injected", "x-forwarded-for", "cookie", "authorization"} & set(headers)
    assert "%0d%0a" not in headers["x-request-id"]
