"""Rate limits per key, the concurrency limit (the gateway in the test's process, tests/support/
memory_gateway.py), and exact counts across worker processes (gateway processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway, gateway_env, raw_post
from tests.support.memory_gateway import MemoryGateway
from tests.support.processes import REPO_ROOT, free_port

CHAT = chat_body("sim", max_tokens=1)


def test_default_limit_counts_down_in_headers_and_then_refuses(tmp_path, simulator):
    env = {"GATEWAY_RATE_LIMIT": "3/minute"}
    with MemoryGateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        with gateway.http(gateway.key) as client:
            remaining = [
                client.post("/v1/chat/completions", json=CHAT).headers["x-ratelimit-remaining-requests"]
                for _ in range(3)
            ]
            refused = client.post("/v1/chat/completions", json=CHAT)
        with gateway.http(gateway.admin_key) as other_key:
            assert other_key.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert remaining == ["2", "1", "0"]
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_per_key_limit_overrides_the_default(memory_gateway):
    _, key = memory_gateway.create_key("generous", rate_limit="1000/minute")
    with memory_gateway.http(key) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.headers["x-ratelimit-limit-requests"] == "1000"


def test_requests_beyond_the_concurrency_limit_get_503(tmp_path, simulator):
    simulator.set_faults(slow_start=1.5)
    env = {"GATEWAY_CONCURRENCY_LIMIT": "2"}
    with MemoryGateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        # Four clients at once, each on its own connection.
        connections = [gateway.connect() for _ in range(4)]
        for connection in connections:
            connection.send(raw_post(gateway.key, CHAT))
        statuses = [gateway.read_response(connection, timeout=30).status for connection in connections]
    assert sorted(statuses) == [200, 200, 503, 503]


def test_several_workers_on_per_process_memory_are_refused(tmp_path):
    env = gateway_env(tmp_path, free_port())
    env["GATEWAY_WORKERS"] = "4"
    result = subprocess.run(
        [sys.executable, "vllm_api_server.py", "serve"],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "GATEWAY_RATE_LIMIT_STORAGE" in result.stderr and "4 workers" in result.stderr


def test_several_workers_with_admission_and_no_redis_are_refused_naming_gateway_redis_url(tmp_path):
    env = gateway_env(tmp_path, free_port())
    env.update({"GATEWAY_WORKERS": "2", "GATEWAY_RATE_LIMIT_STORAGE": "memcached://127.0.0.1:11211"})
    result = subprocess.run(
        [sys.executable, "vllm_api_server.py", "serve"],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("vllm_api_server: refusing to start 2 workers"), result.stderr
    assert "admission's counts and queues" in result.stderr and "GATEWAY_REDIS_URL" in result.stderr


def test_counts_are_exact_across_workers_with_a_shared_store(tmp_path, simulator, redis_url):
    env = {"GATEWAY_WORKERS": "3", "GATEWAY_RATE_LIMIT_STORAGE": redis_url, "GATEWAY_RATE_LIMIT": "10/minute"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        statuses = []
        # New connections each time, so the kernel spreads them over the workers.
        for _ in range(16):
            with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.key}"}) as client:
                statuses.append(client.post("/v1/chat/completions", json=CHAT).status_code)
        pids = {
            int(line.split("Started server process [")[1].split("]")[0])
            for line in (tmp_path / "gateway.stdout.log").read_text().splitlines()
            if "Started server process" in line
        }
    assert statuses.count(200) == 10 and statuses.count(429) == 6
    assert len(pids) == 3
