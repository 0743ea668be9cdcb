"""Keys at the door: where they are accepted, what they may reach, and that they never travel on."""

from __future__ import annotations

import time

from tests.support.chat import chat_body

CHAT = chat_body("sim", max_tokens=2)


def test_key_is_accepted_in_the_query_string(gateway):
    with gateway.http() as client:
        assert client.post("/v1/chat/completions", params={"api_key": gateway.key}, json=CHAT).status_code == 200
        assert client.get("/v1/models", params={"api_key": gateway.key}).status_code == 200


def test_missing_key_is_401_in_openai_shape(gateway):
    with gateway.http() as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"


def test_clients_key_is_not_forwarded_but_the_request_id_is(gateway, simulator):
    with gateway.http(gateway.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"X-Request-ID": "trace-42"},
            params={"api_key": gateway.key, "keep": "me"},
        )
    assert response.headers["x-request-id"] == "trace-42"
    seen = simulator.stats()["last_request"]
    assert "authorization" not in seen["headers"]
    assert seen["headers"]["x-request-id"] == "trace-42"
    assert gateway.key not in str(seen)


def test_request_id_is_generated_when_missing_or_unsafe(gateway, simulator):
    with gateway.http(gateway.key) as client:
        generated = client.post("/v1/chat/completions", json=CHAT).headers["x-request-id"]
        unsafe = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "a b\tc;rm"})
    assert len(generated) == 32
    assert unsafe.headers["x-request-id"] != "a b\tc;rm"
    assert simulator.stats()["last_request"]["headers"]["x-request-id"] == unsafe.headers["x-request-id"]


def test_disabled_key_is_refused_until_enabled_again(gateway):
    created = gateway.create_key("--name", "to-disable")
    gateway.wait_for_key(created["key"])
    gateway.cli("keys", "update", created["id"], "--disabled")
    time.sleep(1.2)
    with gateway.http(created["key"]) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        gateway.cli("keys", "update", created["id"], "--no-disabled")
        time.sleep(1.2)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_key_restricted_to_other_models_sees_and_reaches_none_of_the_rest(tmp_path, simulator):
    from tests.support.gateway import Backend, Gateway
    from tests.support.processes import free_port

    backends = [Backend("sim", simulator.base_url), Backend("other-model", f"http://127.0.0.1:{free_port()}")]
    with Gateway.start(tmp_path, backends, wait_ready=False) as gateway:
        restricted = gateway.create_key("--name", "only-other", "--models", "other-model")["key"]
        with gateway.http(restricted) as client:
            assert [model["id"] for model in client.get("/v1/models").json()["data"]] == ["other-model"]
            assert client.get("/v1/models/sim").status_code == 404
            refused = client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"


def test_backend_key_from_the_config_is_sent_upstream(tmp_path):
    from tests.support.gateway import Backend, Gateway
    from tests.support.processes import Simulator

    with Simulator.start(tmp_path, "--api-key", "backend-secret") as simulator:
        backend = Backend("sim", simulator.base_url, api_key="backend-secret")
        with Gateway.start(tmp_path / "gw", [backend]) as gateway:
            with gateway.http(gateway.key) as client:
                assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert simulator.stats()["last_request"]["headers"]["authorization"] == "Bearer backend-secret"


def test_health_without_a_key_reveals_no_paths_or_urls(gateway, simulator):
    public = gateway.health()
    assert public["models"][0]["status"] == "ready"
    assert "/models/sim" not in str(public) and simulator.base_url not in str(public)
    detailed = gateway.health(gateway.key)
    assert detailed["models"][0]["path"] == "/models/sim"
    assert detailed["models"][0]["backends"][0]["url"] == simulator.base_url
