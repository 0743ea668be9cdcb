"""A one-worker gateway's rate and token windows outlive a restart (window_file.py): a key at its limit
stays there after a stop, a restart or a kill -9 (less the last second), and a broken window file
costs the counts, never the start. Redis keeps its own counts, and the setting turns the file off.

The gateway runs in the test's process (tests/support/memory_gateway.py) in front of a simulator process:
its stop is the end of its lifespan, where a SIGTERM to its process ends too, and a restart is a new one
in the same directory. The kill -9 needs a gateway process.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway
from tests.support.memory_gateway import MemoryGateway
from tests.support.processes import wait_until

# The simulator answers max_tokens tokens with ignore_eos; chat_body's "hi" is one prompt token: 21 in all.
ANSWER = {"max_tokens": 20, "ignore_eos": True}
ANSWER_TOKENS = 21


def chat(gateway: Gateway | MemoryGateway, key: str) -> httpx.Response:
    with gateway.http(key) as client:
        return client.post("/v1/chat/completions", json=chat_body("sim", **ANSWER))


def windows(gateway: Gateway | MemoryGateway, key: str) -> dict[str, list[dict[str, object]]]:
    """GET /v1/usage's windows of the key, as they stand (reading them counts nothing)."""
    with gateway.http(key) as client:
        response = client.get("/v1/usage", params={"start_time": 0})
    assert response.status_code == 200, response.text
    return response.json()["limits"]


def window_file(gateway: Gateway) -> Path:
    return Path(gateway.env["GATEWAY_KEY_FILE"]).parent / "limit_windows.json"


def saved_counts(path: Path) -> list[int]:
    """The counts of the windows in the window file at `path`, as last written."""
    try:
        return [entry[-1] for entry in json.loads(path.read_text())["windows"]]
    except (OSError, ValueError):
        return []


def test_a_key_at_its_request_limit_stays_there_after_a_restart(tmp_path, simulator):
    backend = Backend("sim", simulator.base_url)
    with MemoryGateway.start(tmp_path, [backend]) as first:
        _, key = first.create_key("three-an-hour", rate_limit="3/hour")
        statuses = [chat(first, key).status_code for _ in range(3)]
    with MemoryGateway.start(tmp_path, [backend]) as second:
        refused = chat(second, key)
        requests = windows(second, key)["requests"][0]
        log = second.log_text()

    assert statuses == [200, 200, 200]
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 3000 < int(refused.headers["retry-after"]) <= 3600  # the same hour's window, not a new one
    assert (requests["used"], requests["remaining"]) == (3, 0)
    assert "rate-limit windows restored from" in log


def test_a_keys_token_budget_is_not_given_back_by_a_restart(tmp_path, simulator):
    backend = Backend("sim", simulator.base_url)
    with MemoryGateway.start(tmp_path, [backend]) as first:
        _, key = first.create_key("day-budget", token_limit="50/day")
        statuses = [chat(first, key).status_code for _ in range(3)]  # 63 tokens: the third went over
    before = simulator.stats()["requests"].get("/v1/chat/completions", 0)
    with MemoryGateway.start(tmp_path, [backend]) as second:
        refused = chat(second, key)
        tokens = windows(second, key)["tokens"][0]
    after = simulator.stats()["requests"].get("/v1/chat/completions", 0)

    assert statuses == [200, 200, 200]
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens", refused.text
    assert after == before  # refused before the backend
    assert (tokens["window"], tokens["used"], tokens["remaining"]) == ("50/day", 3 * ANSWER_TOKENS, 0)
    assert tokens["resets_in_s"] > 86400 - 120


def test_a_kill_9_forgets_at_most_the_last_write_of_the_windows(tmp_path, simulator):
    env = {"GATEWAY_LIMIT_STATE_FLUSH_SECONDS": "0.2"}
    backend = Backend("sim", simulator.base_url)
    with Gateway.start(tmp_path, [backend], env=env) as first:
        key = str(first.create_key("--name", "killed", "--rate-limit", "5/hour")["key"])
        first.wait_for_key(key)
        statuses = [chat(first, key).status_code for _ in range(4)]
        wait_until(lambda: 4 in saved_counts(window_file(first)), timeout=10)
        first.handle.popen.send_signal(signal.SIGKILL)
        first.handle.popen.wait(10)
    with Gateway.start(tmp_path, [backend], env=env) as second:
        requests = windows(second, key)["requests"][0]
        last = chat(second, key)
        over = chat(second, key)

    assert statuses == [200] * 4
    assert (requests["used"], requests["remaining"]) == (4, 1)
    assert (last.status_code, over.status_code) == (200, 429)


def test_a_window_file_that_does_not_read_is_logged_and_written_anew(tmp_path, simulator):
    (tmp_path / "limit_windows.json").write_text('{"version": 1, "windows": [["key", "k", 3')
    with MemoryGateway.start(tmp_path, [Backend("sim", simulator.base_url)]) as gateway:
        _, key = gateway.create_key("after-a-broken-file", rate_limit="3/hour")
        status = chat(gateway, key).status_code
        # Written once a second by a task on the gateway's loop: the loop runs while the test waits.
        gateway.until(lambda: 1 in saved_counts(tmp_path / "limit_windows.json"), timeout=10, interval=0.05)
        log = gateway.log_text()

    assert status == 200
    assert f"rate-limit windows in {tmp_path / 'limit_windows.json'} not read" in log
    assert "the counts start over" in log
    assert (tmp_path / "limit_windows.json").stat().st_mode & 0o777 == 0o600


def test_windows_that_ended_are_not_restored(tmp_path, simulator):
    with MemoryGateway.start(tmp_path, [Backend("sim", simulator.base_url)], wait_ready=False) as first:
        key_id, key = first.create_key("ended", rate_limit="2/hour")
    # As a gateway stopped long ago left it: the hour's window ended a minute ago, at its limit.
    ended = time.time() - 60
    entries = [["key", key_id, 2, 3600, ended, 2]]
    (tmp_path / "limit_windows.json").write_text(json.dumps({"version": 1, "windows": entries}))
    with MemoryGateway.start(tmp_path, [Backend("sim", simulator.base_url)]) as second:
        answered = chat(second, key)
        requests = windows(second, key)["requests"][0]

    assert answered.status_code == 200
    assert requests["used"] == 1


def test_with_the_setting_off_a_restart_starts_the_windows_over(tmp_path, simulator):
    env = {"GATEWAY_LIMIT_STATE": "false"}
    backend = Backend("sim", simulator.base_url)
    with MemoryGateway.start(tmp_path, [backend], env=env) as first:
        _, key = first.create_key("forgotten", rate_limit="1/hour")
        statuses = [chat(first, key).status_code for _ in range(2)]
    with MemoryGateway.start(tmp_path, [backend], env=env) as second:
        again = chat(second, key).status_code

    assert statuses == [200, 429]
    assert again == 200
    assert not (tmp_path / "limit_windows.json").exists()


def test_a_gateway_counting_in_redis_writes_no_window_file(tmp_path, simulator, redis_url):
    env = {"GATEWAY_REDIS_URL": redis_url}
    with MemoryGateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        _, key = gateway.create_key("in-redis", rate_limit="5/hour")
        status = chat(gateway, key).status_code
        gateway.run(1.5)  # past a write's interval, had there been one

    assert status == 200
    assert not (tmp_path / "limit_windows.json").exists()
