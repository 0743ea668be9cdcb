"""The usage ledger: every request's tokens per key, model and hour in SQLite, read through
GET /admin/usage (OpenAI's organization usage shape) and `vllm_api_server.py usage`; streams are
counted even when their client did not ask for the usage, and that client never sees the extra chunk."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.support.gateway import Backend, Gateway, run_cli
from tests.support.processes import wait_until
from vllm_gateway.usage_ledger import FIELDS, HourCounts, SQLiteUsageStore, UsageLedger

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
FLUSH = {"GATEWAY_USAGE_FLUSH_SECONDS": "0.2"}
ROUNDS_FOR_BOTH_WORKERS = 4


def usage_results(gateway: Gateway, **params: object) -> list[dict]:
    query = {"start_time": int(time.time()) - 3600, "bucket_width": "1d", **params}
    with gateway.http(gateway.admin_key) as client:
        response = client.get("/admin/usage", params=query)
    assert response.status_code == 200, response.text
    return [result for bucket in response.json()["data"] for result in bucket["results"]]


def wait_for_usage(gateway: Gateway, requests: int, timeout: float = 10.0, **params: object) -> dict:
    """The ledger's sums once it counts `requests` requests (each worker writes its batches within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        results = usage_results(gateway, **params)
        counted = sum(result["num_model_requests"] for result in results)
        if counted >= requests or time.monotonic() > deadline:
            return {
                "requests": counted,
                "input_tokens": sum(result["input_tokens"] for result in results),
                "output_tokens": sum(result["output_tokens"] for result in results),
            }
        time.sleep(0.1)


def settled_usage(gateway: Gateway) -> dict:
    """The ledger's sums once earlier requests' batches are all written (two reads a few batches apart agree)."""
    last = wait_for_usage(gateway, 0, timeout=0)
    while True:
        time.sleep(3 * float(FLUSH["GATEWAY_USAGE_FLUSH_SECONDS"]))
        now = wait_for_usage(gateway, 0, timeout=0)
        if now == last:
            return now
        last = now


def make_traffic(gateway: Gateway, rounds: int = 3) -> dict:
    """Non-streamed and streamed chats with the SDK; the sums of the usage the answers reported."""
    client = gateway.openai()
    sums = {"requests": 0, "input_tokens": 0, "output_tokens": 0}
    for number in range(rounds):
        answer = client.chat.completions.create(**CHAT)
        stream = list(
            client.chat.completions.create(
                **{**CHAT, "max_tokens": 3 + number}, stream=True, stream_options={"include_usage": True}
            )
        )
        for usage in (answer.usage, stream[-1].usage):
            sums["requests"] += 1
            sums["input_tokens"] += usage.prompt_tokens
            sums["output_tokens"] += usage.completion_tokens
    return sums


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, simulator):
    with Gateway.start(tmp_path_factory.mktemp("gw"), [Backend("sim", simulator.base_url)], env=FLUSH) as gateway:
        yield gateway


def test_ledger_totals_equal_the_usage_in_the_answers(gateway):
    before = settled_usage(gateway)
    sums = make_traffic(gateway)
    after = wait_for_usage(gateway, before["requests"] + sums["requests"])
    assert {name: after[name] - before[name] for name in sums} == sums


def test_a_stream_without_include_usage_is_counted_and_its_client_sees_no_usage_chunk(gateway, simulator):
    before = settled_usage(gateway)
    chunks = list(gateway.openai().chat.completions.create(**{**CHAT, "max_tokens": 7}, stream=True))
    assert chunks and all(chunk.choices for chunk in chunks), "a chunk with empty choices reached the client"
    assert all(chunk.usage is None for chunk in chunks)
    sent = simulator.stats()["last_request"]["body"]
    assert sent["stream_options"] == {"include_usage": True}  # the gateway asked vLLM on the client's behalf
    after = wait_for_usage(gateway, before["requests"] + 1)
    assert after["output_tokens"] - before["output_tokens"] == 7


def test_raw_sse_without_include_usage_has_every_event_but_the_usage_chunk(gateway):
    body = {**CHAT, "max_tokens": 4, "stream": True}
    with gateway.http(gateway.key) as client:
        raw = client.post("/v1/chat/completions", json=body).content
    events = [event for event in raw.split(b"\n\n") if event]
    assert events[-1] == b"data: [DONE]"
    payloads = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert len(payloads) == 1 + 4  # the role, then a token per event
    assert all(payload["choices"] for payload in payloads)
    assert b'"usage"' not in raw


def test_a_client_that_asked_for_usage_gets_exactly_one_usage_chunk(gateway):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with gateway.http(gateway.key) as client:
        raw = client.post("/v1/chat/completions", json=body).content
    assert raw.count(b'"choices":[]') == 1 and raw.count(b'"usage"') == 1


def test_a_completions_stream_without_usage_is_counted_too(gateway):
    before = settled_usage(gateway)
    chunks = list(gateway.openai().completions.create(model="sim", prompt="the", max_tokens=6, stream=True))
    assert all(chunk.choices for chunk in chunks)
    after = wait_for_usage(gateway, before["requests"] + 1)
    assert after["output_tokens"] - before["output_tokens"] == 6


def test_an_aborted_stream_is_counted_with_its_prompt_and_the_tokens_it_delivered_and_marked(tmp_path, simulator):
    env = {**FLUSH, "GATEWAY_TOKEN_LIMIT": "100000/hour"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        body = {**CHAT, "max_tokens": 2000, "stream": True}  # ten seconds at the simulator's rate
        delivered = 0
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {gateway.key}"}) as client:
            with client.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    delivered += line.startswith('data: {"id"') and '"content":""' not in line
                    if delivered == 10:
                        break
        deadline = time.monotonic() + 10
        while True:
            rows = json.loads(gateway.cli("usage", "--by", "key,model", "--json").stdout)
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # The same tokens count against the key's token limit.
        with gateway.http(gateway.key) as client:
            remaining = client.post("/v1/chat/completions", json=CHAT).headers["x-ratelimit-remaining-tokens"]
    (row,) = rows
    assert row["requests"] == 1 and row["aborted"] == 1 and row["errors"] == 0
    # What the client read, and what was on its way when it left: never the 2000 it asked for.
    assert 10 <= row["completion_tokens"] == row["aborted_completion_tokens"] < 200
    # And its prompt, which vLLM read in full: the backend's /tokenize counted it ("hello there").
    assert row["prompt_tokens"] == 2
    assert int(remaining) == 100000 - row["completion_tokens"] - row["prompt_tokens"]


def test_usage_api_groups_by_key_and_model_and_pages_by_hour(tmp_path, simulator):
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=FLUSH) as gateway:
        other = gateway.create_key("--name", "other")
        gateway.wait_for_key(other["key"])
        gateway.openai().chat.completions.create(**CHAT)
        gateway.openai(key=other["key"]).chat.completions.create(**{**CHAT, "max_tokens": 2})
        wait_for_usage(gateway, 2)
        grouped = usage_results(gateway, group_by="api_key_id,model")
        by_key = {result["api_key_id"]: result for result in grouped}
        assert by_key[other["id"]]["output_tokens"] == 2 and by_key[other["id"]]["model"] == "sim"
        assert len(by_key) == 2
        assert {result["object"] for result in grouped} == {"organization.usage.completions.result"}
        mine = usage_results(gateway, **{"api_key_ids[]": other["id"]})
        assert [(result["api_key_id"], result["num_model_requests"]) for result in mine] == [(None, 1)]

        now = int(time.time())
        with gateway.http(gateway.admin_key) as client:
            first = client.get(
                "/admin/usage", params={"start_time": now - 5 * 3600, "bucket_width": "1h", "limit": 3}
            ).json()
            assert first["object"] == "page" and first["has_more"] is True and len(first["data"]) == 3
            starts = [bucket["start_time"] for bucket in first["data"]]
            assert all(later - earlier == 3600 for earlier, later in itertools.pairwise(starts))
            second = client.get(
                "/admin/usage",
                params={"start_time": now - 5 * 3600, "bucket_width": "1h", "limit": 3, "page": first["next_page"]},
            ).json()
            assert second["data"][0]["start_time"] == starts[-1] + 3600 and second["has_more"] is False
            counted = sum(r["num_model_requests"] for b in first["data"] + second["data"] for r in b["results"])
            assert counted == 2
        table = gateway.cli("usage", "--since", "1d", "--by", "key,model").stdout
        assert "other" in table and "completion_tokens" in table
        # `keys list` shows each key's use from the ledger.
        listing = {key["id"]: key for key in json.loads(gateway.cli("keys", "list", "--json").stdout)}
        assert listing[other["id"]]["usage_30d"]["completion_tokens"] == 2
        assert listing[other["id"]]["usage_30d"]["requests"] == 1
        header = gateway.cli("keys", "list").stdout.splitlines()[0]
        assert header.split()[-4:] == ["REQUESTS", "30D", "TOKENS", "30D"]


@pytest.mark.parametrize(
    "params, param",
    [
        ({}, "start_time"),
        ({"start_time": "soon"}, "start_time"),
        ({"start_time": 0, "bucket_width": "1m"}, "bucket_width"),
        ({"start_time": 0, "group_by": "project_id"}, "group_by"),
        ({"start_time": 0, "bucket_width": "1h", "limit": 169}, "limit"),
        ({"start_time": 0, "page": "12"}, "page"),
        ({"start_time": 0, "page": "²"}, "page"),
        ({"start_time": 0, "bucket_width": "1h", "limit": 0}, "limit"),
        # numbers int() takes, or chokes on with a 500, that a unix time never is
        *[
            ({"start_time": bad}, "start_time")
            for bad in ("²", "--5", "-5", "+5", "1_000", " 5", "5.0", "1e11", "nan", "inf", "٣", "1" * 5000)
        ],
        ({"start_time": 0, "end_time": "9" * 20}, "end_time"),
        ({"start_time": 0, "limit": "1" * 5000}, "limit"),
    ],
)
def test_bad_usage_queries_get_400_in_openais_shape(gateway, params, param):
    with gateway.http(gateway.admin_key) as client:
        response = client.get("/admin/usage", params=params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def test_a_query_over_centuries_builds_one_page_of_buckets_only(gateway):
    before = peak_rss_kib(gateway.handle.pid)
    with gateway.http(gateway.admin_key) as client:
        response = client.get("/admin/usage", params={"start_time": 0, "end_time": 10**10, "bucket_width": "1h"})
    grown = peak_rss_kib(gateway.handle.pid) - before
    assert response.status_code == 200
    page = response.json()
    assert [bucket["start_time"] for bucket in page["data"]] == [hour * 3600 for hour in range(24)]
    assert page["has_more"] is True and page["next_page"] == str(24 * 3600)
    # 2.8 million hours in the span: a list of them all would take some 100 MB.
    assert grown < 30 * 1024, f"the worker's peak memory grew by {grown} KiB"


def test_usage_api_needs_an_admin_key(gateway):
    with gateway.http(gateway.key) as client:
        assert client.get("/admin/usage", params={"start_time": 0}).status_code == 403
    with gateway.http() as client:
        assert client.get("/admin/usage", params={"start_time": 0}).status_code == 401


def test_the_ledger_survives_a_restart(tmp_path, simulator):
    backend = Backend("sim", simulator.base_url)
    with Gateway.start(tmp_path, [backend], env=FLUSH) as first:
        sums = make_traffic(first, rounds=2)
        wait_for_usage(first, sums["requests"])
    with Gateway.start(tmp_path, [backend], env=FLUSH) as second:
        assert wait_for_usage(second, sums["requests"], timeout=0) == sums


def test_a_ledger_file_deleted_while_running_is_made_again_and_keeps_counting(tmp_path, simulator):
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=FLUSH) as gateway:
        before = make_traffic(gateway, rounds=1)
        wait_for_usage(gateway, before["requests"])
        for name in ("usage.db", "usage.db-wal", "usage.db-shm"):  # as `rm usage.db*` does
            (tmp_path / name).unlink(missing_ok=True)
        assert usage_results(gateway) == []  # answered (200), from a new, empty file
        after = make_traffic(gateway, rounds=2)  # counted in memory first, then written to the new file
        assert wait_for_usage(gateway, after["requests"]) == after
        assert settled_usage(gateway) == after
    with sqlite3.connect(tmp_path / "usage.db") as connection:
        assert connection.execute("SELECT SUM(requests) FROM usage").fetchone() == (after["requests"],)


def test_a_batch_the_ledger_file_refuses_waits_whole_for_the_next_one(tmp_path):
    store = SQLiteUsageStore(tmp_path / "usage.db")
    store.BUSY_TIMEOUT_MS = 50  # how long a flush waits for the lock below before it gives up
    ledger = UsageLedger(store, flush_seconds=3600)
    ledger.record("key_a", "m", 10, 5, error=False, aborted=False)
    ledger.record("key_a", "m", 7, 3, error=True, aborted=False)
    ledger.record("key_b", "m", 4, 2, error=False, aborted=True)
    holder = sqlite3.connect(tmp_path / "usage.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the file
    asyncio.run(ledger.flush())
    assert store.rows(0, 2**40) == []  # refused whole
    ledger.record("key_a", "m", 1, 1, error=False, aborted=True)  # counted meanwhile
    holder.execute("ROLLBACK")
    holder.close()

    asyncio.run(ledger.flush())
    totals: dict[str, list[int]] = {}
    for row in store.rows(0, 2**40):  # summed by key: records on either side of an hour's end are two rows
        mine = totals.setdefault(row.key_id, [0] * 6)
        figures = (row.requests, row.prompt_tokens, row.completion_tokens, row.errors, row.aborted)
        for index, value in enumerate((*figures, row.aborted_completion_tokens)):
            mine[index] += value
    assert totals == {"key_a": [3, 18, 9, 1, 1, 1], "key_b": [1, 4, 2, 0, 1, 2]}
    assert ledger.pending == {}


def test_an_hours_counts_reach_the_store_in_the_order_of_its_columns():
    counts = HourCounts(**{name: 10 + index for index, name in enumerate(FIELDS)})
    assert counts.as_counts() == [10 + index for index in range(len(FIELDS))]


def test_kill_9_loses_at_most_the_last_batch_and_never_corrupts_the_ledger(tmp_path, simulator):
    env = {"GATEWAY_USAGE_FLUSH_SECONDS": "1"}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        sums = make_traffic(gateway, rounds=3)
        assert wait_for_usage(gateway, sums["requests"]) == sums  # all written
        client = gateway.openai()
        for _ in range(4):  # counted in memory, in the batch not written yet
            client.chat.completions.create(**CHAT)
        gateway.handle.popen.send_signal(signal.SIGKILL)
        gateway.handle.popen.wait(10)
    database = tmp_path / "usage.db"
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        requests, completion = connection.execute("SELECT SUM(requests), SUM(completion_tokens) FROM usage").fetchone()
    assert sums["requests"] <= requests <= sums["requests"] + 4
    assert completion >= sums["output_tokens"]


def test_two_workers_write_one_ledger_exactly(tmp_path, simulator, redis_url):
    env = {**FLUSH, "GATEWAY_WORKERS": "2", "GATEWAY_RATE_LIMIT_STORAGE": redis_url}
    with Gateway.start(tmp_path, [Backend("sim", simulator.base_url)], env=env) as gateway:
        sums = {"requests": 0, "input_tokens": 0, "output_tokens": 0}
        # Which worker accepts a connection is the kernel's choice: the rounds go on until both have
        # served some (each worker's metrics snapshot counts its own).
        for _ in range(ROUNDS_FOR_BOTH_WORKERS):
            for number in range(12):
                # A new connection each time, so the kernel spreads them over the workers.
                with gateway.http(gateway.key) as client:
                    body = {**CHAT, "max_tokens": 1 + number % 4}
                    usage = client.post("/v1/chat/completions", json=body).json()["usage"]
                sums["requests"] += 1
                sums["input_tokens"] += usage["prompt_tokens"]
                sums["output_tokens"] += usage["completion_tokens"]

            def counted(total: int = sums["requests"]) -> list[float] | None:
                counts = gateway.requests_by_worker("sim")
                return counts if sum(counts) >= total else None

            served = wait_until(counted)
            if len(served) == 2 and all(served):
                break
        assert wait_for_usage(gateway, sums["requests"]) == sums
    assert len(served) == 2 and all(served), served


def test_usage_command_rejects_unknown_groupings(gateway):
    with pytest.raises(RuntimeError, match="--by takes key, model and hour"):
        run_cli(gateway.env, "usage", "--by", "colour")


def test_a_key_reads_its_own_usage_and_windows_and_no_one_elses(gateway):
    own = str(
        gateway.create_key("--name", "self-service", "--rate-limit", "50/minute", "--token-limit", "9000/hour")["key"]
    )
    client = gateway.openai(own)
    answers = [client.chat.completions.create(**CHAT) for _ in range(2)]
    used_tokens = sum(answer.usage.total_tokens for answer in answers)
    query = {"start_time": int(time.time()) - 3600, "bucket_width": "1d", "group_by": "api_key_id"}

    def mine() -> dict:
        with gateway.http(own) as http:
            response = http.get("/v1/usage", params=query)
        assert response.status_code == 200, response.text
        return response.json()

    deadline = time.monotonic() + 10
    while sum(r["num_model_requests"] for b in mine()["data"] for r in b["results"]) < 2:
        assert time.monotonic() < deadline, mine()
        time.sleep(0.1)
    page = mine()
    results = [result for bucket in page["data"] for result in bucket["results"]]
    assert {result["api_key_id"] for result in results} == {results[0]["api_key_id"]}  # its own only
    assert sum(result["num_model_requests"] for result in results) == 2
    assert [(w["window"], w["limit"]) for w in page["limits"]["requests"]] == [("50/minute", 50)]
    assert page["limits"]["requests"][0]["used"] == 2  # the two chats (reading the usage counts not)
    tokens = page["limits"]["tokens"][0]
    assert (tokens["window"], tokens["limit"], tokens["used"]) == ("9000/hour", 9000, used_tokens)
    assert tokens["remaining"] == 9000 - used_tokens and 0 < tokens["resets_in_s"] <= 3600
    with gateway.http(own) as http:
        others = http.get("/v1/usage", params={**query, "api_key_ids": "key_someone_else"})
        anonymous = httpx_get_without_key(gateway)
    assert others.status_code == 403 and others.json()["error"]["type"] == "permission_error"
    assert anonymous == 401


def httpx_get_without_key(gateway: Gateway) -> int:
    with gateway.http() as http:
        return http.get("/v1/usage", params={"start_time": 0}).status_code
