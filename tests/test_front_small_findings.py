"""The spec's smaller findings: worker count and in-memory rate-limit stores, the trailing-slash
redirect built from the client's Host, keys in the access log, a deleted key file, the simulator's
answer to JSON of the wrong types, and the cap on client connections (GATEWAY_MAX_CONNECTIONS).

The trailing slash, the access log and the connection cap run on the gateway in the test's process
(tests/support/memory_gateway.py); what needs a gateway process keeps one: starting with two workers, the
key file that `keys init` (the command line) writes again, and the open-files limit the process raises."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway, gateway_env, raw_post, run_cli, write_model_config
from tests.support.memory_gateway import MemoryGateway
from tests.support.memory_server import MemoryConnection
from tests.support.processes import REPO_ROOT, free_port, start_process, wait_until

CHAT = chat_body("sim", max_tokens=2)
HEALTH = b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
# The gateway writes keys' last-used times to the key file this often (GATEWAY_KEY_USAGE_FLUSH_SECONDS,
# 30 s by default): a deleted key file must still be absent after a flush.
USAGE_FLUSH_SECONDS = 1.0


@pytest.fixture(scope="module")
def memory_gateway(tmp_path_factory, simulator):
    with MemoryGateway.start(tmp_path_factory.mktemp("gw-small"), [Backend("sim", simulator.base_url)]) as gateway:
        yield gateway


# -- workers and in-memory rate-limit stores --


@pytest.mark.parametrize("storage", ["memory://", "async+memory://", "MEMORY://", "memory:///"])
def test_two_workers_with_an_in_memory_rate_limit_store_refuse_to_start(tmp_path, storage):
    env = gateway_env(tmp_path, free_port())
    env.update({"GATEWAY_WORKERS": "2", "GATEWAY_RATE_LIMIT_STORAGE": storage})
    write_model_config(Path(env["VLLM_MODEL_CONFIG"]), [])
    run_cli(env, "keys", "create", "--name", "admin", "--admin")
    handle = start_process(
        [sys.executable, str(REPO_ROOT / "vllm_api_server.py"), "serve"], env=env, log_path=tmp_path / "serve.log"
    )
    try:
        try:
            handle.popen.wait(timeout=10)  # refusing takes a second or two
        except subprocess.TimeoutExpired:
            pytest.fail(f"started 2 workers with GATEWAY_RATE_LIMIT_STORAGE={storage}; log:\n{handle.log_tail(8)}")
    finally:
        handle.stop()
    assert handle.returncode == 2, handle.log_tail(8)
    assert "GATEWAY_RATE_LIMIT_STORAGE" in handle.log()


# -- trailing slash --


def test_trailing_slash_is_a_404_not_a_redirect_to_the_clients_host(memory_gateway):
    authorization = f"Authorization: Bearer {memory_gateway.admin_key}\r\n"
    response = memory_gateway.exchange(
        f"GET /admin/keys/ HTTP/1.1\r\nHost: evil.example\r\n{authorization}\r\n".encode()
    )
    status, headers, body = response.status, dict(response.headers), response.body
    assert "location" not in headers, headers
    assert status == 404, (status, headers)
    assert json.loads(body)["error"]["code"] == "not_found"
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert "evil.example" not in json.dumps(headers) and b"evil.example" not in body


# -- keys in the access log --


def key_requests(key: str) -> dict[str, bytes]:
    auth = f"Authorization: Bearer {key}\r\n"
    return {
        "query in an encoded path": f"GET /v1/models%3Fapi_key={key} HTTP/1.1\r\nHost: gw\r\n{auth}\r\n".encode(),
        "path": f"GET /v1/models/{key} HTTP/1.1\r\nHost: gw\r\n{auth}\r\n".encode(),
        "percent-encoded path": f"GET /v1/models/%73{key[1:]} HTTP/1.1\r\nHost: gw\r\n{auth}\r\n".encode(),
        "x-request-id": raw_post(key, CHAT, extra=f"X-Request-ID: {key}\r\n"),
        "model in the body": raw_post(key, {**CHAT, "model": key}),
    }


@pytest.mark.parametrize("where", list(key_requests("sk-x")))
def test_a_key_never_reaches_the_access_log(memory_gateway, where):
    # A key of its own (names are unique: one each): no other test's lines hold it.
    _, key = memory_gateway.create_key(f"leaky-{where.replace(' ', '-')}")
    before = memory_gateway.log_text()
    status = memory_gateway.exchange(key_requests(key)[where]).status
    text = memory_gateway.log_text()
    secret = key[3:]  # what follows "sk-": its first characters may be shown as the key's prefix
    assert secret not in text, [line for line in text.splitlines() if secret in line]
    new = text[len(before) :].splitlines()
    assert any(f"status={status}" in line and " access " in line for line in new), new


# -- a deleted key file --


def test_deleting_the_key_file_revokes_every_key_until_keys_init(tmp_path, simulator):
    env = {"GATEWAY_KEY_USAGE_FLUSH_SECONDS": str(USAGE_FLUSH_SECONDS)}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        key_file = Path(gateway.env["GATEWAY_KEY_FILE"])
        for key in (gateway.admin_key, gateway.key):
            with gateway.http(key) as client:
                assert client.get("/v1/models").status_code == 200  # used: a last-used time to flush

        key_file.unlink()

        def statuses() -> list[int]:
            codes = []
            for key in (gateway.admin_key, gateway.key):
                with gateway.http(key) as client:
                    codes.append(client.get("/v1/models").status_code)
            return codes

        try:
            wait_until(lambda: statuses() == [401, 401], timeout=3)
        except TimeoutError:
            pytest.fail(f"keys still answered {statuses()} three seconds after the key file was deleted")

        # Past a few last-used flushes, the file is still not there.
        time.sleep(3 * USAGE_FLUSH_SECONDS + 1)
        assert not key_file.exists(), "the gateway recreated the deleted key file"
        assert statuses() == [401, 401]
        log = gateway.log_text()
        errors = [line for line in log.splitlines() if " ERROR " in line and str(key_file) in line]
        assert any(
            re.search(r"missing|not found|does not exist|no such file|deleted", line, re.I) for line in errors
        ), errors
        assert "status=401" in log

        init = gateway.cli("keys", "init")
        new_admin = re.search(r"sk-[A-Za-z0-9_-]{20,}", init.stdout)
        assert new_admin, init.stdout
        gateway.wait_for_key(new_admin.group(0), timeout=3)
        with gateway.http(new_admin.group(0)) as client:
            assert client.get("/admin/keys").status_code == 200
        assert statuses() == [401, 401]


# -- the simulator and JSON of the wrong types --


def test_simulator_tokenize_with_messages_true_is_400(simulator):
    response = httpx.post(simulator.base_url + "/tokenize", json={"model": "sim", "messages": True}, timeout=10)
    assert response.status_code == 400, response.text[:200]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/tokenize", {"model": "sim", "messages": "hi"}),
        ("/tokenize", {"model": "sim", "messages": [1, 2]}),
        ("/tokenize", {"model": "sim", "messages": [{"role": "user", "content": 5}]}),
        ("/v1/chat/completions", {"model": "sim", "messages": [{"role": "user", "content": {"x": 1}}]}),
        ("/v1/completions", {"model": "sim", "prompt": {"a": 1}}),
        ("/v1/embeddings", {"model": "sim", "input": [1, None]}),
    ],
    ids=lambda value: value if isinstance(value, str) else json.dumps(value),
)
def test_simulator_answers_json_of_the_wrong_types_with_4xx(simulator, path, body):
    response = httpx.post(simulator.base_url + path, json=body, timeout=10)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:200])


# -- GATEWAY_MAX_CONNECTIONS --


@contextlib.contextmanager
def open_file_soft_limit(soft: int):
    """Processes started inside inherit a lower soft RLIMIT_NOFILE (the hard one stays)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, before[1]), before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.fixture(scope="module")
def capped_gateway(tmp_path_factory, simulator):
    with open_file_soft_limit(1024):
        gateway = Gateway.start(
            tmp_path_factory.mktemp("gw-capped"),
            [Backend("sim", simulator.base_url)],
            env={"GATEWAY_MAX_CONNECTIONS": "20"},
        )
    with gateway:
        yield gateway


@pytest.fixture(scope="module")
def capped_memory_gateway(tmp_path_factory, simulator):
    with MemoryGateway.start(
        tmp_path_factory.mktemp("gw-capped-memory"),
        [Backend("sim", simulator.base_url)],
        env={"GATEWAY_MAX_CONNECTIONS": "20"},
    ) as gateway:
        yield gateway


def served(gateway: MemoryGateway, connection: MemoryConnection) -> bool:
    if connection.gone:  # a socket's send fails on a connection the gateway closed
        return False
    connection.send(HEALTH)
    try:
        response = gateway.read_response(connection)
    except AssertionError:  # closed (or silent) without an answer
        return False
    return response.status == 200


def test_connection_beyond_max_connections_is_closed_at_once_and_the_others_keep_working(capped_memory_gateway):
    gateway = capped_memory_gateway
    first = [gateway.connect() for _ in range(20)]
    try:
        assert all(served(gateway, connection) for connection in first)
        extra = gateway.connect()
        extra.send(HEALTH)
        assert gateway.read_to_end(extra, timeout=3) == b"", "the 21st connection got an answer"
        assert all(served(gateway, connection) for connection in first)

        for connection in first[:5]:
            connection.send_eof()  # the client closes: the gateway closes too

        def new_one_served() -> bool:
            connection = gateway.connect()
            try:
                return served(gateway, connection)
            finally:
                connection.disconnect()

        gateway.poll(new_one_served, timeout=5, interval=0.1)
    finally:
        for connection in first:
            if not connection.gone:
                connection.disconnect()


def test_hitting_the_connection_limit_is_logged(capped_memory_gateway):
    gateway = capped_memory_gateway
    held = [gateway.connect() for _ in range(21)]
    try:
        gateway.run(0.5)
    finally:
        for connection in held:
            if not connection.gone:  # the one beyond the cap is closed already
                connection.disconnect()
    try:
        gateway.poll(lambda: "connection limit" in gateway.log_text(settle=0), timeout=5)
    except TimeoutError:
        pytest.fail("no log line about the connection limit after 21 connections with GATEWAY_MAX_CONNECTIONS=20")


def test_gateway_raises_its_open_file_soft_limit_to_the_hard_limit(capped_gateway):
    soft, hard = None, None
    for line in Path(f"/proc/{capped_gateway.handle.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
    if hard is not None and hard != "unlimited" and int(hard) <= 1024:
        pytest.skip("the hard limit is not above the soft limit the gateway was started with")
    assert soft == hard, f"soft {soft}, hard {hard}"
