"""Token limits per key: counted from each answer's usage, refused before the backend once used up,
set over the API and the CLI, the gateway-wide default, and exact counts across workers with Redis;
and request limits of several windows, in the same syntax.

The gateway runs in the test's process (tests/support/memory_gateway.py) in front of a simulator process;
the tests of the command line and of two workers start it as a process.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway
from tests.support.memory_gateway import MemoryGateway
from tests.support.processes import wait_until

# The simulator answers max_tokens tokens with ignore_eos; chat_body's "hi" is one prompt token: 21 in all.
ANSWER = {"max_tokens": 20, "ignore_eos": True}
ANSWER_TOKENS = 21
TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def chat(client: httpx.Client) -> httpx.Response:
    """One chat completion; the answer, whatever its status."""
    return client.post("/v1/chat/completions", json=chat_body("sim", **ANSWER))


def streamed_chat_usage(client: httpx.Client) -> tuple[httpx.Response, int]:
    """A streamed chat completion that asks for its usage; the answer and the total tokens of the last
    usage in its events."""
    response = client.post(
        "/v1/chat/completions", json=chat_body("sim", stream=True, stream_options={"include_usage": True}, **ANSWER)
    )
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    usage = [event["usage"] for event in events if event.get("usage")]
    return response, usage[-1]["total_tokens"]


def backend_requests(simulator) -> int:
    return simulator.stats()["requests"].get("/v1/chat/completions", 0)


def test_key_out_of_tokens_gets_429_before_the_backend_and_recovers_in_the_next_window(memory_gateway, simulator):
    _, key = memory_gateway.create_key("few-tokens", token_limit="30/5 seconds")
    with memory_gateway.http(key) as client:
        streamed, streamed_tokens = streamed_chat_usage(client)  # a stream counts too: 21 of 30
        over = chat(client)  # 9 left: admitted, and its 21 tokens count in full
        before = backend_requests(simulator)
        refused = chat(client)
        after = backend_requests(simulator)

    assert streamed.status_code == 200 and streamed.headers["x-ratelimit-remaining-tokens"] == "30"
    assert streamed_tokens == ANSWER_TOKENS
    assert over.status_code == 200 and over.headers["x-ratelimit-remaining-tokens"] == "9"
    assert refused.status_code == 429
    assert refused.json() == {
        "error": {
            "message": refused.json()["error"]["message"],
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert refused.headers["x-ratelimit-limit-tokens"] == "30"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert 1 <= int(refused.headers["retry-after"]) <= 5
    assert after == before, "a refused request must not reach the backend"

    deadline = memory_gateway.now() + 30
    with memory_gateway.http(key) as client:
        while (recovered := chat(client)).status_code == 429:
            assert memory_gateway.now() < deadline, "the token window never reopened"
            memory_gateway.run(0.5)
    assert recovered.status_code == 200
    assert recovered.headers["x-ratelimit-remaining-tokens"] == "30"


def test_token_headers_on_answers_count_down_by_each_answers_usage(memory_gateway):
    _, key = memory_gateway.create_key("counted", token_limit="100000/minute;2000000/day")
    with memory_gateway.http(key) as client:
        first = chat(client)
        second = chat(client)
    assert (first.status_code, second.status_code) == (200, 200)
    usage = first.json()["usage"]
    assert usage is not None
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"  # the window with the fewest left
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 100000
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 100000 - used
    assert second.headers["x-ratelimit-reset-tokens"].endswith("s")


def test_keys_without_a_token_limit_get_no_token_headers(memory_gateway):
    with memory_gateway.http(memory_gateway.key) as client:
        response = chat(client)
    assert response.status_code == 200
    assert not any(name in response.headers for name in TOKEN_HEADERS)


def test_gateway_token_limit_applies_to_keys_without_their_own(tmp_path, simulator):
    env = {"GATEWAY_TOKEN_LIMIT": "25/minute"}
    with MemoryGateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        _, own = gateway.create_key("own-limit", token_limit="5000/minute")
        with gateway.http(gateway.key) as defaulted:
            answers = [chat(defaulted) for _ in range(3)]
        with gateway.http(own) as client:
            with_own = chat(client)
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-tokens"] == "25"
    assert answers[2].json()["error"]["type"] == "tokens"
    assert with_own.status_code == 200 and with_own.headers["x-ratelimit-limit-tokens"] == "5000"


def test_request_limit_of_several_windows_refuses_at_the_tightest(memory_gateway):
    _, key = memory_gateway.create_key("two-windows", rate_limit="100/hour;2/minute")
    with memory_gateway.http(key) as client:
        answers = [chat(client) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert [answer.headers["x-ratelimit-remaining-requests"] for answer in answers] == ["1", "0", "0"]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[2].json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(answers[2].headers["retry-after"]) <= 60


def test_token_limit_is_set_and_cleared_over_the_api(memory_gateway):
    with memory_gateway.http(memory_gateway.admin_key) as admin:
        created = admin.post("/admin/keys", json={"name": "api-tokens", "token_limit": "40000/minute;2000000/day"})
        assert created.status_code == 201
        key_id = created.json()["id"]
        assert created.json()["token_limit"] == "40000/minute;2000000/day"
        assert admin.get(f"/admin/keys/{key_id}").json()["token_limit"] == "40000/minute;2000000/day"
        changed = admin.patch(
            f"/admin/keys/{key_id}", json={"token_limit": "500/hour", "rate_limit": "5/second;50/hour"}
        )
        assert changed.status_code == 200
        assert (changed.json()["token_limit"], changed.json()["rate_limit"]) == ("500/hour", "5/second;50/hour")
        cleared = admin.patch(f"/admin/keys/{key_id}", json={"token_limit": None})
        assert cleared.status_code == 200 and cleared.json()["token_limit"] is None
        listed = {entry["id"]: entry for entry in admin.get("/admin/keys").json()["data"]}
    assert listed[key_id]["token_limit"] is None and listed[key_id]["rate_limit"] == "5/second;50/hour"


def test_token_limit_is_set_shown_and_cleared_with_the_cli(gateway):
    created = gateway.create_key("--name", "cli-tokens", "--token-limit", "40000/minute")
    assert created["token_limit"] == "40000/minute"
    key_id = str(created["id"])
    gateway.cli("keys", "update", key_id, "--token-limit", "2000000/day;40000/minute")
    table = gateway.cli("keys", "list").stdout.splitlines()
    assert "TOKEN LIMIT" in table[0]
    assert "2000000/day;40000/minute" in next(line for line in table if line.startswith(key_id))
    gateway.cli("keys", "update", key_id, "--token-limit", "default")
    listed = {entry["id"]: entry for entry in json.loads(gateway.cli("keys", "list", "--json").stdout)}
    assert listed[key_id]["token_limit"] is None


@pytest.mark.parametrize("limit", ["lots", "100/fortnight", "", "10/minute;x"])
def test_invalid_token_limit_gets_400_and_leaves_the_key_file_unchanged(gateway, limit):
    key_file = gateway.workdir / "api_keys.json"
    key_id = str(gateway.create_key("--name", f"unchanged-{len(limit)}-{limit.count(';')}")["id"])  # names are unique
    before = keys_but_their_last_use(key_file)
    with gateway.http(gateway.admin_key) as admin:
        responses = [
            admin.post("/admin/keys", json={"name": "bad-tokens", "token_limit": limit}),
            admin.patch(f"/admin/keys/{key_id}", json={"token_limit": limit}),
        ]
    by_cli = gateway.cli("keys", "create", "--name", "bad-tokens", "--token-limit", limit, check=False)
    for response in responses:
        assert response.status_code == 400
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert by_cli.returncode == 1 and "token_limit" in by_cli.stderr
    assert keys_but_their_last_use(key_file) == before


def keys_but_their_last_use(key_file) -> list[dict[str, object]]:
    """The key file's records without the time each key was last used, which the gateway writes down on
    its own, a few seconds after a key's first use (the admin key's, in the test above)."""
    return [
        {name: value for name, value in key.items() if name != "last_used_at"}
        for key in json.loads(key_file.read_text())["keys"]
    ]


def test_token_counts_are_shared_across_workers_with_a_shared_store(tmp_path, simulator, redis_url):
    # 50 tokens: two answers of 21 leave 8, a third is admitted and goes over, and every later one is
    # refused, whichever worker takes it. Counted per worker, each worker would admit three.
    env = {"GATEWAY_WORKERS": "2", "GATEWAY_RATE_LIMIT_STORAGE": redis_url, "GATEWAY_TOKEN_LIMIT": "50/minute"}
    log = tmp_path / "gateway.stdout.log"

    def worker_pids() -> set[int]:
        return {
            int(line.split("Started server process [")[1].split("]")[0])
            for line in log.read_text().splitlines()
            if "Started server process" in line
        }

    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        # The gateway answers once one worker listens; the counts are shared only if both do.
        pids = wait_until(lambda: worker_pids() if len(worker_pids()) == 2 else None, timeout=60)
        statuses = []
        remaining = []
        for _ in range(12):
            # A new connection each time, so the kernel spreads them over the workers.
            with httpx.Client(
                base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=30
            ) as client:
                response = client.post(
                    "/v1/chat/completions",
                    json=chat_body("sim", max_tokens=20, ignore_eos=True),
                )
            statuses.append(response.status_code)
            remaining.append(response.headers["x-ratelimit-remaining-tokens"])
        assert worker_pids() == pids  # both still serve: neither worker died and was replaced
    assert statuses == [200] * 3 + [429] * 9
    assert remaining == ["50", "29", "8"] + ["0"] * 9
