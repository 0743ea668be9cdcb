"""Admission: a backend never gets more than its capacity, the rest wait in the gateway, fairly.

The gateway runs in the test's process (tests/support/memory_gateway.py; a scenario's clients are
coroutines on its loop) in front of simulator processes that generate slowly; capacities come from the
model config (max_num_seqs, max_concurrency), while the simulators' own engines are large, so that what
reaches them is what the gateway let through (the simulator's peak_running). Where the command line
sets a key's fields, the gateway is a process.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway, raw_post
from tests.support.memory_gateway import ASKING_A_PROCESS, MemoryGateway
from tests.support.memory_server import MemoryConnection
from tests.support.processes import Simulator, parse_metrics, wait_until_async
from vllm_gateway.keystore import KeyStore

CHAT = "/v1/chat/completions"


def chat(max_tokens: int, stream: bool = True) -> dict[str, object]:
    return chat_body("sim", max_tokens=max_tokens, stream=stream)


async def stream_through(client: httpx.AsyncClient, key: str, max_tokens: int) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", CHAT, json=chat(max_tokens), headers=headers) as response:
        async for _ in response.aiter_bytes():
            pass
        return response.status_code


async def end(*streams: asyncio.Task[int]) -> None:
    """Cut streams that held slots for as long as a scenario needed them (their client leaves)."""
    for stream in streams:
        stream.cancel()
    await asyncio.gather(*streams, return_exceptions=True)


def chat_requests(simulator: Simulator) -> int:
    return int(simulator.stats()["requests"].get(CHAT, 0))


@pytest.fixture
def simulator(tmp_path: Path):
    # A big engine, generating 20 tokens a second: whatever the gateway sends runs at once.
    with Simulator.start(tmp_path, "--max-num-seqs", "64", "--token-rate", "20") as simulator:
        yield simulator


def backend(simulator: Simulator, **capacity: str) -> Backend:
    return Backend("sim", simulator.base_url, path="/models/sim", **capacity)


def start_gateway(
    tmp_path: Path, simulator: Simulator, env: dict[str, str] | None = None, **capacity: str
) -> MemoryGateway:
    return MemoryGateway.start(tmp_path / "gw", [backend(simulator, **capacity)], env=env)


def hold_the_slot(gateway: MemoryGateway) -> MemoryConnection:
    """A client streaming 2000 tokens (a hundred seconds), once its first has come: it holds its slot
    until the test disconnects it."""
    blocker = gateway.connect()
    blocker.send(raw_post(gateway.key, chat(2000)))
    assert gateway.read_until(blocker, b"data: {").startswith(b"HTTP/1.1 200")
    return blocker


@pytest.mark.parametrize(
    "capacity",
    [{"max_num_seqs": "4"}, {"max_num_seqs": "16", "max_concurrency": "4"}],
    ids=["max_num_seqs", "max_concurrency"],
)
def test_a_backend_never_has_more_than_its_capacity_in_flight(
    tmp_path: Path, simulator: Simulator, capacity: dict[str, str]
) -> None:
    with start_gateway(tmp_path, simulator, **capacity) as gateway:
        assert gateway.health(gateway.admin_key)["models"][0]["backends"][0]["capacity"] == 4  # type: ignore[index]

        async def twenty_streams() -> list[int]:
            async with gateway.async_http() as client:
                return await asyncio.gather(*(stream_through(client, gateway.key, 6) for _ in range(20)))

        statuses = gateway.run_async(twenty_streams())
        stats = simulator.stats()
        log = gateway.log_text()

    assert statuses == [200] * 20
    assert stats["completed"] == 20
    assert stats["peak_running"] == 4
    # Those that waited say so in their log line; those that went at once do not.
    lines = [line for line in log.splitlines() if " access " in line and CHAT in line]
    assert len(lines) == 20
    assert 4 <= sum("queue_ms=" not in line for line in lines) < 20


def test_a_queued_request_whose_client_disconnects_never_reaches_the_backend(
    tmp_path: Path, simulator: Simulator
) -> None:
    with start_gateway(tmp_path, simulator, max_num_seqs="1") as gateway:
        blocker = hold_the_slot(gateway)
        gateway.until(lambda: simulator.stats()["running"] == 1, interval=ASKING_A_PROCESS)
        queued = gateway.connect()
        queued.send(raw_post(gateway.key, chat(5)))
        gateway.until(lambda: gateway.waiting() == 1)
        queued.disconnect()
        gateway.until(lambda: gateway.waiting() == 0 and gateway.in_flight() == 1)
        blocker.disconnect()
        # The slot is free again: the next request goes through, the one that left never went.
        with gateway.http(gateway.key) as client:
            assert client.post(CHAT, json=chat(2, stream=False)).status_code == 200
        assert chat_requests(simulator) == 2
        assert " status=499 " in gateway.log_text()


def test_a_key_at_its_parallel_requests_gets_429_at_once(tmp_path: Path, simulator: Simulator) -> None:
    with start_gateway(tmp_path, simulator, max_num_seqs="1") as gateway:
        _, capped = gateway.create_key("capped", max_parallel_requests=2)

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with gateway.async_http() as client:
                # Long streams, ended by the test once it saw what it looks for: however slow this
                # machine, both are in flight (one relayed, one waiting) while the others come.
                two = [asyncio.create_task(stream_through(client, capped, 2000)) for _ in range(2)]
                await wait_until_async(lambda: gateway.in_flight() == 2)
                third = await client.post(CHAT, json=chat(2), headers={"Authorization": f"Bearer {capped}"})
                other_key = asyncio.create_task(
                    client.post(CHAT, json=chat(2, stream=False), headers={"Authorization": f"Bearer {gateway.key}"})
                )
                await wait_until_async(lambda: gateway.waiting() == 2)  # the capped key's second, and this one
                await end(*two)
                return third, await other_key

        refused, other = gateway.run_async(scenario())
        with gateway.http() as client:
            metrics = client.get("/metrics").text

    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {
        "error": {
            "message": "This API key has 2 requests in flight or waiting, its limit. Wait for one to finish.",
            "type": "rate_limit_error",
            "param": None,
            "code": "parallel_requests_exceeded",
        }
    }
    assert other.status_code == 200  # another key is not held to this one's cap
    assert 'vllm_gateway_rate_limited_total{key="capped",kind="parallel"} 1' in metrics


def test_admission_across_keys_follows_their_weights(tmp_path: Path, simulator: Simulator) -> None:
    with start_gateway(tmp_path, simulator, max_num_seqs="1") as gateway:
        _, light = gateway.create_key("light")
        _, heavy = gateway.create_key("heavy", weight=2)
        order: list[str] = []

        async def one(client: httpx.AsyncClient, name: str, key: str) -> int:
            response = await client.post(CHAT, json=chat(2, stream=False), headers={"Authorization": f"Bearer {key}"})
            order.append(name)
            return response.status_code

        async def scenario() -> list[int]:
            async with gateway.async_http() as client:
                blocker = asyncio.create_task(stream_through(client, gateway.key, 2000))
                await wait_until_async(lambda: gateway.in_flight() == 1)
                tasks = [asyncio.create_task(one(client, "A", light)) for _ in range(6)]
                await wait_until_async(lambda: gateway.waiting() == 6)
                tasks += [asyncio.create_task(one(client, "B", heavy)) for _ in range(6)]
                await wait_until_async(lambda: gateway.waiting() == 12)
                await end(blocker)  # its slot goes to the twelve, in the keys' turns
                return await asyncio.gather(*tasks)

        statuses = gateway.run_async(scenario())

    assert statuses == [200] * 12
    # Deficit round robin: A's turn sends one, B's turn two, until B has nothing left to send.
    assert "".join(order) == "ABBABBABBAAA"


def test_tokenize_never_waits_for_a_full_backend(tmp_path: Path, simulator: Simulator) -> None:
    with start_gateway(tmp_path, simulator, {"GATEWAY_QUEUE_TIMEOUT": "5"}, max_num_seqs="1") as gateway:
        hold_the_slot(gateway)
        assert gateway.in_flight() == 1
        with gateway.http(gateway.key) as client:
            tokenized = client.post("/tokenize", json={"model": "sim", "prompt": "a b c"})
        assert gateway.waiting() == 0
        assert simulator.stats()["running"] == 1  # the stream still runs: tokenize did not wait for it

    assert tokenized.status_code == 200


def test_a_request_that_waits_longer_than_the_queue_timeout_gets_503(tmp_path: Path, simulator: Simulator) -> None:
    with start_gateway(tmp_path, simulator, {"GATEWAY_QUEUE_TIMEOUT": "0.5"}, max_num_seqs="1") as gateway:
        hold_the_slot(gateway)
        queued = gateway.connect()
        queued.send(raw_post(gateway.key, chat(2, stream=False)))
        refused = gateway.read_response(queued, timeout=30)  # liveness only
        assert chat_requests(simulator) == 1

    assert refused.status == 503
    assert refused.header("retry-after") == "1"
    error = json.loads(refused.body)["error"]
    assert (error["code"], error["type"], error["param"]) == ("queue_timeout", "server_error", "model")


def test_a_request_beyond_the_queue_limit_gets_503_at_once(tmp_path: Path, simulator: Simulator) -> None:
    with start_gateway(tmp_path, simulator, {"GATEWAY_QUEUE_LIMIT": "1"}, max_num_seqs="1") as gateway:

        async def scenario() -> tuple[int, int, httpx.Response]:
            async with gateway.async_http() as client:
                blocker = asyncio.create_task(stream_through(client, gateway.key, 2000))
                await wait_until_async(lambda: gateway.in_flight() == 1)
                queued = asyncio.create_task(stream_through(client, gateway.key, 2))
                await wait_until_async(lambda: gateway.waiting() == 1)
                refused = await client.post(CHAT, json=chat(2), headers={"Authorization": f"Bearer {gateway.key}"})
                await end(blocker)
                return await queued, refused

        second, refused = gateway.run_async(scenario())
        assert chat_requests(simulator) == 2

    assert second == 200
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"


def test_queued_requests_get_503_when_their_model_has_no_ready_server_left(
    tmp_path: Path, simulator: Simulator
) -> None:
    with start_gateway(tmp_path, simulator, max_num_seqs="1") as gateway:

        async def scenario() -> tuple[httpx.Response, int]:
            async with gateway.async_http() as client:
                blocker = asyncio.create_task(stream_through(client, gateway.key, 2000))
                await wait_until_async(lambda: gateway.in_flight() == 1)
                queued = asyncio.create_task(
                    client.post(CHAT, json=chat(2, stream=False), headers={"Authorization": f"Bearer {gateway.key}"})
                )
                await wait_until_async(lambda: gateway.waiting() == 1)
                # The server stops being ready (its /health fails) while its stream goes on.
                simulator.set_faults(health_status=503)
                refused = await queued
                streaming = not blocker.done()  # answered at once: before the stream in flight ended
                await end(blocker)
                return refused, streaming

        refused, streaming = gateway.run_async(scenario())

        assert chat_requests(simulator) == 1

    assert streaming
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_not_ready"
    assert refused.headers["retry-after"] == "10"


def test_a_queued_request_goes_to_the_replica_that_frees_up(tmp_path: Path) -> None:
    with (
        Simulator.start(tmp_path, "--max-num-seqs", "64", "--token-rate", "20") as one,
        Simulator.start(tmp_path, "--max-num-seqs", "64", "--token-rate", "20") as two,
    ):
        backends = [
            Backend("sim", one.base_url, path="/models/sim", id="one", max_num_seqs="1"),
            Backend("sim", two.base_url, path="/models/sim", id="two", max_num_seqs="1"),
        ]
        with MemoryGateway.start(tmp_path / "gw", backends) as gateway:

            async def scenario() -> int:
                async with gateway.async_http() as client:
                    long = asyncio.create_task(stream_through(client, gateway.key, 2000))
                    await wait_until_async(lambda: gateway.in_flight() == 1)
                    short = asyncio.create_task(stream_through(client, gateway.key, 2000))
                    await wait_until_async(lambda: gateway.in_flight() == 2)
                    queued = asyncio.create_task(stream_through(client, gateway.key, 2))
                    await wait_until_async(lambda: gateway.waiting() == 1)
                    await end(short)  # its replica frees up; the long stream's stays busy
                    status = await queued
                    await end(long)
                    return status

            status = gateway.run_async(scenario())
            counts = sorted([chat_requests(one), chat_requests(two)])
            peaks = [one.stats()["peak_running"], two.stats()["peak_running"]]

    assert status == 200
    assert counts == [1, 2]  # the long stream's replica never took another
    assert peaks == [1, 1]


def test_with_admission_off_requests_go_straight_through_within_their_keys_cap(
    tmp_path: Path, simulator: Simulator
) -> None:
    with start_gateway(tmp_path, simulator, {"GATEWAY_ADMISSION": "false"}, max_num_seqs="2") as gateway:

        async def six_streams() -> list[int]:
            async with gateway.async_http() as client:
                return await asyncio.gather(*(stream_through(client, gateway.key, 40) for _ in range(6)))

        statuses = gateway.run_async(six_streams())
        assert simulator.stats()["peak_running"] == 6
        assert "queue_ms=" not in gateway.log_text()

        # The key's own cap still holds: it bounds what one key may have at once, queued or not.
        _, capped = gateway.create_key("capped", max_parallel_requests=2)

        async def three_of_a_capped_key() -> int:
            async with gateway.async_http() as client:
                two = [asyncio.create_task(stream_through(client, capped, 2000)) for _ in range(2)]
                await wait_until_async(lambda: simulator.stats()["running"] == 2)
                third = await stream_through(client, capped, 2)
                await end(*two)
                return third

        third = gateway.run_async(three_of_a_capped_key())

    assert statuses == [200] * 6
    assert third == 429


def test_weight_and_max_parallel_requests_are_set_over_the_api_and_the_cli(
    tmp_path: Path, simulator: Simulator
) -> None:
    with Gateway.start(tmp_path / "gw", [backend(simulator)]) as gateway:
        with gateway.http(gateway.admin_key) as admin:
            created = admin.post("/admin/keys", json={"name": "w", "weight": 2.5, "max_parallel_requests": 3})
            assert created.status_code == 201
            assert (created.json()["weight"], created.json()["max_parallel_requests"]) == (2.5, 3)
            key_id = created.json()["id"]
            assert admin.patch(f"/admin/keys/{key_id}", json={"weight": 0}).status_code == 400
            assert admin.patch(f"/admin/keys/{key_id}", json={"max_parallel_requests": 0}).status_code == 400
            changed = admin.patch(f"/admin/keys/{key_id}", json={"weight": None, "max_parallel_requests": 8})
            assert (changed.json()["weight"], changed.json()["max_parallel_requests"]) == (None, 8)
        made = gateway.create_key("--name", "c", "--weight", "3", "--max-parallel-requests", "5")
        assert (made["weight"], made["max_parallel_requests"]) == (3.0, 5)
        gateway.cli("keys", "update", "c", "--weight", "default", "--max-parallel-requests", "7")
        assert gateway.cli("keys", "update", "c", "--weight", "-1", check=False).returncode == 1
        listed = {record["name"]: record for record in json.loads(gateway.cli("keys", "list", "--json").stdout)}
        assert (listed["c"]["weight"], listed["c"]["max_parallel_requests"]) == (None, 7)
        gateway.cli("keys", "update", "c", "--weight", "2.5")
        table = gateway.cli("keys", "list").stdout.splitlines()
        assert "WEIGHT" in table[0] and "PARALLEL" in table[0]
        row = next(line for line in table if f" {made['name']} " in f" {line} ").split()
        rate_limit = row.index("default")  # then the token limit, the weight and the cap
        assert row[rate_limit + 2 : rate_limit + 4] == ["2.5", "7"]


def test_a_weight_outside_its_range_is_refused_with_a_clear_error(tmp_path: Path, simulator: Simulator) -> None:
    with Gateway.start(tmp_path / "gw", [backend(simulator)]) as gateway:
        with gateway.http(gateway.admin_key) as admin:
            tiny = admin.post("/admin/keys", json={"name": "tiny", "weight": 1e-300})
            lowest = admin.post("/admin/keys", json={"name": "lowest", "weight": 0.01})
            huge = admin.patch(f"/admin/keys/{lowest.json()['id']}", json={"weight": 1001})
        cli_create = gateway.cli("keys", "create", "--name", "tiny", "--weight", "0.001", check=False)
        cli_update = gateway.cli("keys", "update", "lowest", "--weight", "1e-7", check=False)
        cli_word = gateway.cli("keys", "update", "lowest", "--weight", "heavy", check=False)
        names = [record["name"] for record in json.loads(gateway.cli("keys", "list", "--json").stdout)]

    assert tiny.status_code == 400
    error = tiny.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "weight", "invalid_request")
    assert "0.01" in error["message"]
    assert (lowest.status_code, lowest.json()["weight"]) == (201, 0.01)
    assert huge.status_code == 400 and "1000" in huge.json()["error"]["message"]
    assert (cli_create.returncode, cli_create.stderr) == (
        1,
        "vllm_api_server: `weight` does not take 0.001: it takes a number from 0.01 to 1000.\n",
    )
    assert (cli_update.returncode, cli_update.stderr) == (
        1,
        "vllm_api_server: `weight` does not take 1e-07: it takes a number from 0.01 to 1000.\n",
    )
    assert (cli_word.returncode, cli_word.stderr) == (
        1,
        "vllm_api_server: --weight takes a number or 'default', not 'heavy'\n",
    )
    assert sorted(names) == ["lowest", "test-admin", "test-user"]


def test_a_key_file_weight_below_the_minimum_counts_as_the_minimum_and_never_stalls_admission(
    tmp_path: Path, simulator: Simulator
) -> None:
    """A key file written before the minimum may hold any positive weight; 1e-300 once spun the
    worker's loop for ever as soon as that key alone waited (/health unanswered)."""
    with start_gateway(tmp_path, simulator, max_num_seqs="1") as gateway:
        made, tiny = gateway.create_key("tiny", weight=0.5)
        key_file = gateway.state.settings.key_file
        content = json.loads(key_file.read_text())
        for record in content["keys"]:
            if record["id"] == made:
                record["weight"] = 1e-300
        key_file.write_text(json.dumps(content))
        gateway.poll(lambda: "key file reloaded" in gateway.log_text(settle=0), timeout=10)

        async def scenario() -> tuple[httpx.Response, dict[str, object]]:
            async with gateway.async_http(timeout=20) as client:
                blocker = asyncio.create_task(stream_through(client, gateway.key, 1000))  # holds the one slot
                await wait_until_async(lambda: gateway.in_flight() == 1)
                queued = asyncio.create_task(
                    client.post(CHAT, json=chat(2, stream=False), headers={"Authorization": f"Bearer {tiny}"})
                )
                await wait_until_async(lambda: gateway.waiting() == 1)
                await end(blocker)  # the slot goes to the one key waiting, whose weight is tiny
                answer = await queued
                health = (await client.get("/health")).json()
                return answer, health

        answer, health = gateway.run_async(scenario())
        # As `keys list` reads the file: the weight counts as the minimum.
        store = KeyStore(key_file)
        store.load()
        listed = {record.name: record for record in store.records()}

    assert answer.status_code == 200
    assert health["status"] == "ok"
    assert listed["tiny"].weight == 0.01


def test_the_metrics_show_the_queue_its_waits_and_each_keys_requests(tmp_path: Path, simulator: Simulator) -> None:
    def scrape(gateway: MemoryGateway) -> str:
        with gateway.http() as client:
            return client.get("/metrics").text

    with start_gateway(tmp_path, simulator, max_num_seqs="1") as gateway:
        blocker = hold_the_slot(gateway)
        gateway.until(lambda: simulator.stats()["running"] == 1, interval=ASKING_A_PROCESS)
        queued = gateway.connect()
        queued.send(raw_post(gateway.key, chat(2, stream=False)))
        gateway.until(lambda: gateway.waiting() == 1)
        text = scrape(gateway)
        assert 'vllm_gateway_queue_length{model="sim"} 1' in text
        assert 'vllm_gateway_key_requests_in_flight{key="test-user"} 2' in text
        blocker.disconnect()  # the first stream ends (its client leaves): the waiting request goes
        assert gateway.read_response(queued, timeout=60).status == 200
        gateway.poll(lambda: parse_metrics(scrape(gateway)).get("vllm_gateway_queue_seconds_count") == 1.0)
        text = scrape(gateway)
    assert 'vllm_gateway_queue_length{model="sim"} 0' in text
    assert gateway.key not in text
