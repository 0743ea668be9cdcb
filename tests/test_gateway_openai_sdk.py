"""The gateway as the official openai SDK sees it: models, chat, completions, embeddings, errors (a
backend's among them)."""

from __future__ import annotations

import openai
import pytest

from tests.support.chat import chat_body


def test_models_lists_each_model_with_its_path_and_status(gateway):
    models = gateway.openai().models.list().data
    assert [m.id for m in models] == ["sim"]
    assert models[0].model_extra["path"] == "/models/sim"
    assert models[0].model_extra["status"] == "ready"
    assert models[0].model_extra["aliases"] == ["sim-alias"]


def test_model_can_be_retrieved_by_name_or_alias(gateway):
    client = gateway.openai()
    assert client.models.retrieve("sim").id == "sim"
    assert client.models.retrieve("sim-alias").id == "sim"


def test_unknown_model_is_not_found(gateway):
    client = gateway.openai()
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**chat_body("nope"))


def test_chat_completion_returns_the_backends_answer_and_usage(gateway):
    reply = gateway.openai().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "one two three"}], max_tokens=7
    )
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens == 3
    assert reply.usage.completion_tokens == 7


def test_chat_stream_delivers_every_token_and_the_usage_chunk(gateway):
    stream = gateway.openai().chat.completions.create(
        **chat_body("sim-alias", max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) == 12
    assert chunks[-1].usage.completion_tokens == 12


def test_completions_stream_and_non_stream(gateway):
    client = gateway.openai()
    whole = client.completions.create(model="sim", prompt="a b", max_tokens=5)
    assert whole.usage.completion_tokens == 5
    pieces = [
        c.choices[0].text for c in client.completions.create(model="sim", prompt="a b", max_tokens=5, stream=True)
    ]
    assert "".join(pieces).strip() == whole.choices[0].text.strip()


def test_embeddings_are_relayed(gateway):
    result = gateway.openai().embeddings.create(model="sim", input=["first", "second"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) > 0
    assert result.data[0].embedding != result.data[1].embedding


def test_wrong_key_raises_authentication_error(gateway):
    with pytest.raises(openai.AuthenticationError) as caught:
        gateway.openai(key="sk-not-a-key").models.list()
    assert caught.value.body["code"] == "invalid_api_key"


def test_admin_endpoint_with_user_key_raises_permission_denied(gateway):
    client = openai.OpenAI(base_url=gateway.url, api_key=gateway.key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.get("/admin/keys", cast_to=object)


def test_exceeding_the_rate_limit_raises_rate_limit_error(gateway):
    key = gateway.create_key("--name", "limited", "--rate-limit", "2/minute")["key"]
    gateway.wait_for_key(key)
    client = gateway.openai(key=key)
    for _ in range(2):
        client.chat.completions.create(**chat_body("sim", max_tokens=1))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**chat_body("sim", max_tokens=1))
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["retry-after"]) >= 1


def test_backend_crash_mid_stream_raises_in_the_openai_sdk(gateway, simulator):
    simulator.set_faults(crash_after_tokens=2)
    stream = gateway.openai().chat.completions.create(**chat_body("sim", max_tokens=10, stream=True))
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert len(received) >= 2


def test_backend_error_status_is_relayed_as_is(gateway, simulator):
    simulator.set_faults(error_status=500)
    with pytest.raises(openai.InternalServerError) as caught:
        gateway.openai().chat.completions.create(**chat_body("sim"))
    assert caught.value.status_code == 500
    assert caught.value.body["type"] == "InternalServerError"


def test_the_openai_sdk_reads_the_message_of_a_rewrapped_error(gateway, simulator):
    # The simulator answers as a server lacking the route does ({"detail": ...}); the gateway rewraps it.
    simulator.set_faults(error_status=404, error_shape="detail")
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.openai().chat.completions.create(**chat_body("sim"))
    assert caught.value.body == {
        "message": "Simulated engine failure (injected fault).",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
