"""Keys at the door: where they are accepted, what they may reach, and that they never travel on. The
gateway runs in the test's process (tests/support/memory_gateway.py) in front of simulator processes."""

from __future__ import annotations

from tests.support.chat import chat_body
from tests.support.gateway import Backend
from tests.support.memory_gateway import MemoryGateway
from tests.support.processes import Simulator, free_port
from vllm_gateway.keystore import KeyStore

CHAT = chat_body("sim", max_tokens=2)


def test_key_is_accepted_in_the_query_string(memory_gateway):
    with memory_gateway.http() as client:
        assert client.post("/v1/chat/completions", params={"api_key": memory_gateway.key}, json=CHAT).status_code == 200
        assert client.get("/v1/models", params={"api_key": memory_gateway.key}).status_code == 200


def test_missing_key_is_401_in_openai_shape(memory_gateway):
    with memory_gateway.http() as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"


def test_clients_key_is_not_forwarded_but_the_request_id_is(memory_gateway, simulator):
    with memory_gateway.http(memory_gateway.key) as client:
        response = client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"X-Request-ID": "trace-42"},
            params={"api_key": memory_gateway.key, "keep": "me"},
        )
    assert response.headers["x-request-id"] == "trace-42"
    seen = simulator.stats()["last_request"]
    assert "authorization" not in seen["headers"]
    assert seen["headers"]["x-request-id"] == "trace-42"
    assert memory_gateway.key not in str(seen)


def test_request_id_is_generated_when_missing_or_unsafe(memory_gateway, simulator):
    with memory_gateway.http(memory_gateway.key) as client:
        generated = client.post("/v1/chat/completions", json=CHAT).headers["x-request-id"]
        unsafe = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-ID": "a b\tc;rm"})
    assert len(generated) == 32
    assert unsafe.headers["x-request-id"] != "a b\tc;rm"
    assert simulator.stats()["last_request"]["headers"]["x-request-id"] == unsafe.headers["x-request-id"]


def test_disabled_key_is_refused_until_enabled_again(memory_gateway):
    key_id, key = memory_gateway.create_key("to-disable")
    # Changed in the key file by another writer (the command line, another worker), as an admin would.
    other_writer = KeyStore(memory_gateway.state.settings.key_file)
    other_writer.load()
    other_writer.update(key_id, {"disabled": True})
    memory_gateway.run(1.2)  # the gateway looks at the key file twice a second
    with memory_gateway.http(key) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        other_writer.update(key_id, {"disabled": False})
        memory_gateway.run(1.2)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_key_restricted_to_other_models_sees_and_reaches_none_of_the_rest(tmp_path, simulator):
    backends = [Backend("sim", simulator.base_url), Backend("other-model", f"http://127.0.0.1:{free_port()}")]
    with MemoryGateway.start(tmp_path, backends, wait_ready=False) as gateway:
        _, restricted = gateway.create_key("only-other", models=["other-model"])
        with gateway.http(restricted) as client:
            assert [model["id"] for model in client.get("/v1/models").json()["data"]] == ["other-model"]
            assert client.get("/v1/models/sim").status_code == 404
            refused = client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"


def test_backend_key_from_the_config_is_sent_upstream(tmp_path):
    with Simulator.start(tmp_path, "--api-key", "backend-secret") as simulator:
        backend = Backend("sim", simulator.base_url, api_key="backend-secret")
        with MemoryGateway.start(tmp_path / "gw", [backend]) as gateway:
            with gateway.http(gateway.key) as client:
                assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert simulator.stats()["last_request"]["headers"]["authorization"] == "Bearer backend-secret"


def test_health_without_a_key_reveals_no_paths_or_urls(memory_gateway, simulator):
    public = memory_gateway.health()
    assert public["models"][0]["status"] == "ready"
    assert "/models/sim" not in str(public) and simulator.base_url not in str(public)
    detailed = memory_gateway.health(memory_gateway.key)
    assert detailed["models"][0]["path"] == "/models/sim"
    assert detailed["models"][0]["backends"][0]["url"] == simulator.base_url
