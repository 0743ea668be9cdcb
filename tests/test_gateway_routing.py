"""Which backend a request reaches: replicas, failover, readiness, config changes. The gateway runs in the
test's process (tests/support/memory_gateway.py), but where the openai SDK or the command line asks it."""

from __future__ import annotations

import json
import time

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway, raw_post, write_model_config
from tests.support.memory_gateway import MemoryGateway
from tests.support.processes import Simulator, free_port

JSON = {"content-type": "application/json"}
CHAT = chat_body("m", max_tokens=2)


def test_replicas_share_the_load_by_requests_in_flight(tmp_path):
    with (
        Simulator.start(tmp_path, "--token-rate", "20", model="m") as one,
        Simulator.start(tmp_path, "--token-rate", "20", model="m") as two,
    ):
        backends = [Backend("m", one.base_url, id="m-a"), Backend("m", two.base_url, id="m-b")]
        with MemoryGateway.start(tmp_path / "gw", backends) as gateway:
            # Six clients at once, each on its own connection.
            connections = [gateway.connect() for _ in range(6)]
            for connection in connections:
                connection.send(raw_post(gateway.key, {**CHAT, "max_tokens": 20}))
            statuses = [gateway.read_response(connection, timeout=30).status for connection in connections]
            counts = [simulator.stats()["requests"].get("/v1/chat/completions", 0) for simulator in (one, two)]
    assert statuses == [200] * 6
    assert counts == [3, 3]


def test_a_replica_that_refuses_connections_is_skipped_without_errors(tmp_path):
    with Simulator.start(tmp_path, model="m") as one, Simulator.start(tmp_path, model="m") as two:
        backends = [Backend("m", one.base_url, id="m-a"), Backend("m", two.base_url, id="m-b")]
        with MemoryGateway.start(tmp_path / "gw", backends, env={"GATEWAY_HEALTH_INTERVAL": "60"}) as gateway:
            one.stop()  # the gateway has not noticed yet: its next check is a minute away
            with gateway.http(gateway.key) as client:
                statuses = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(4)]
            health = gateway.health(gateway.admin_key)
    assert statuses == [200] * 4
    states = {b["id"]: b["status"] for b in health["models"][0]["backends"]}
    assert states == {"m-a": "down", "m-b": "ready"}


def test_model_whose_server_is_loading_gets_503_with_retry_after(tmp_path):
    with Simulator.start(tmp_path, "--health-status", "503", model="m") as simulator:
        with MemoryGateway.start(tmp_path / "gw", [Backend("m", simulator.base_url)], wait_ready=False) as gateway:
            gateway.wait_until(lambda health: health["models"][0]["status"] == "loading")
            with gateway.http(gateway.key) as client:
                response = client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "10"
            assert "loading" in response.json()["error"]["message"]
            simulator.clear_faults()
            gateway.wait_until(lambda health: health["models"][0]["status"] == "ready")
            with gateway.http(gateway.key) as client:
                assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_backend_that_never_started_is_down_and_health_says_degraded(tmp_path):
    with Simulator.start(tmp_path, model="m") as simulator:
        backends = [Backend("m", simulator.base_url), Backend("ghost", f"http://127.0.0.1:{free_port()}")]
        with MemoryGateway.start(tmp_path / "gw", backends, wait_ready=False) as gateway:
            health = gateway.wait_until(
                lambda h: {m["id"]: m["status"] for m in h["models"]} == {"m": "ready", "ghost": "down"}
            )
    assert health["status"] == "degraded"


def test_a_server_whose_health_answers_later_than_the_health_timeout_is_down(tmp_path):
    # 1 s is well within the default 3 s: with 0.5 the same server counts as down, then ready again.
    with Simulator.start(tmp_path, model="m") as simulator:
        env = {"GATEWAY_HEALTH_TIMEOUT": "0.5", "GATEWAY_HEALTH_INTERVAL": "0.2"}
        with MemoryGateway.start(tmp_path / "gw", [Backend("m", simulator.base_url)], env=env) as gateway:
            simulator.set_faults(slow_health=1)
            gateway.wait_until(lambda health: health["models"][0]["status"] == "down")
            simulator.clear_faults()
            gateway.wait_until(lambda health: health["models"][0]["status"] == "ready")


def test_a_model_added_to_the_config_is_served_without_a_restart(tmp_path):
    with Simulator.start(tmp_path, model="m") as one, Simulator.start(tmp_path, model="new") as two:
        with MemoryGateway.start(tmp_path / "gw", [Backend("m", one.base_url)]) as gateway:
            config = tmp_path / "gw" / "models.sh"
            time.sleep(0.05)  # a modification time the gateway's last look at the file did not see
            write_model_config(config, [Backend("m", one.base_url), Backend("new", two.base_url)])
            gateway.wait_until(lambda health: health["models_ready"] == 2)
            with gateway.http(gateway.key) as client:
                ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
                response = client.post("/v1/chat/completions", json={**CHAT, "model": "new"})
    assert ids == ["m", "new"]
    assert response.status_code == 200


def test_an_alias_added_to_the_config_works_before_its_server_is_restarted(tmp_path):
    with Simulator.start(tmp_path, model="m") as simulator:  # started with its own name only
        with Gateway.start(tmp_path / "gw", [Backend("m", simulator.base_url)]) as gateway:
            time.sleep(0.05)
            write_model_config(tmp_path / "gw" / "models.sh", [Backend("m", simulator.base_url, aliases="mm")])
            gateway.wait_until(lambda health: health["models"][0].get("aliases") == ["mm"])
            client = gateway.openai()
            assert client.models.list().data[0].model_extra["aliases"] == ["mm"]
            reply = client.chat.completions.create(**chat_body("mm", max_tokens=3))
            forwarded = simulator.stats()["last_request"]
            stream = list(client.chat.completions.create(**chat_body("mm", stream=True)))
            # A body over 64 KiB is renamed in the body parser's helper process.
            large = client.chat.completions.create(**chat_body("mm", user="u" * 100_000))
            large_forwarded = simulator.stats()["last_request"]["body"]
            with gateway.http(gateway.key) as http:
                transcribed = http.post(
                    "/v1/audio/transcriptions",
                    data={"model": "mm", "language": "en"},
                    files={"file": ("clip.wav", b"RIFF....WAVEfmt " + bytes(200), "audio/wav")},
                )
            form = simulator.stats()["last_request"]["body"]
    assert reply.usage.completion_tokens == 3
    assert forwarded["body"] == chat_body("m", max_tokens=3)
    assert any(chunk.choices and chunk.choices[0].delta.content for chunk in stream)
    assert large.choices and large_forwarded["model"] == "m" and large_forwarded["user"] == "u" * 100_000
    assert transcribed.status_code == 200, transcribed.text
    assert form["model"] == "m" and form["language"] == "en" and form["file"]["size"] == 216


def test_a_name_the_server_serves_goes_upstream_byte_for_byte(tmp_path):
    body = b'{ "model" : "mm",\n "messages": [{"role": "user", "content": "hi"}], "seed": 12345678901234567890123}'
    seen = []
    with Simulator.start(tmp_path, "--served-model-name", "m", "mm", model="m") as simulator:
        with MemoryGateway.start(tmp_path / "gw", [Backend("m", simulator.base_url, aliases="mm")]) as gateway:
            with gateway.http(gateway.key) as client:
                for named in (body, body.replace(b'"mm"', b'"m"')):
                    answer = client.post("/v1/chat/completions", content=named, headers=JSON)
                    forwarded = simulator.stats()["last_request"]
                    length = forwarded["headers"]["content-length"]
                    seen.append((answer.json()["model"], forwarded["body"]["model"], length))
    # Untouched (a re-serialised body would lose its spaces), and vLLM answers an alias it serves by
    # the name asked for.
    assert seen == [("mm", "mm", str(len(body))), ("m", "m", str(len(body) - 1))]


def test_models_command_prints_the_registry_with_live_status(tmp_path):
    with Simulator.start(tmp_path, model="m") as simulator:
        ghost = f"http://127.0.0.1:{free_port()}"
        with Gateway.start(
            tmp_path / "gw",
            [Backend("m", simulator.base_url, path="/weights/m", aliases="mm"), Backend("ghost", ghost)],
            wait_ready=False,
        ) as gateway:
            table = gateway.cli("models").stdout
            rows = json.loads(gateway.cli("models", "--json").stdout)
    assert "MODEL" in table and "/weights/m" in table
    assert {(r["model"], r["status"]) for r in rows} == {("m", "ready"), ("ghost", "down")}
    assert next(r for r in rows if r["model"] == "m")["aliases"] == ["mm"]
