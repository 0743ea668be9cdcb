"""GET /admin/requests over a real gateway and simulator: the access log's newest request lines, newest
first, filtered by key (id or name), model (name or alias), status and status class, within the limit's
bounds; never a key's secret. Also the log's lines parsed back and read from the end (request_log.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.chat import chat_body
from tests.support.gateway import Backend, Gateway
from tests.support.processes import wait_until
from vllm_gateway.access_log import escape, key_label
from vllm_gateway.request_log import RequestFilter, find_requests, parse


@dataclass
class Sent:
    """A gateway, two keys (alice and bob, as `keys create --json` printed them) and the request ids of
    what they sent, in order: alice: sim, sim-alias, a model that does not exist (404); bob: sim."""

    gateway: Gateway
    alice: dict
    bob: dict
    ids: list[str]


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory, simulator):
    backend = Backend("sim", simulator.base_url, path="/models/sim", aliases="sim-alias")
    with Gateway.start(tmp_path_factory.mktemp("requests"), [backend]) as gateway:
        alice, bob = gateway.create_key("--name", "alice"), gateway.create_key("--name", "bob")
        ids = [
            post(gateway, str(alice["key"]), "sim"),
            post(gateway, str(alice["key"]), "sim-alias"),
            post(gateway, str(alice["key"]), "no-such-model"),
            post(gateway, str(bob["key"]), "sim"),
        ]
        wait_until(lambda: ids[-1] in gateway.log_path.read_text(), timeout=10)
        yield Sent(gateway, alice, bob, ids)


def post(gateway: Gateway, key: str, model: str, path: str = "/v1/chat/completions") -> str:
    """A chat completion (or a POST to `path`); its request id (X-Request-ID)."""
    body = chat_body(model, max_tokens=3)
    with gateway.http(key) as client:
        return client.post(path, json=body).headers["x-request-id"]


def requests(gateway: Gateway, **params: object) -> httpx.Response:
    with gateway.http(gateway.admin_key) as client:
        return client.get("/admin/requests", params=params)


def ids_of(gateway: Gateway, **params: object) -> list[str]:
    response = requests(gateway, **params)
    assert response.status_code == 200, response.text
    return [line["request_id"] for line in response.json()["data"] if line["path"] == "/v1/chat/completions"]


def test_the_newest_lines_come_first_with_every_field(sent: Sent) -> None:
    gateway, ids = sent.gateway, sent.ids
    page = requests(gateway).json()
    assert page["object"] == "list" and page["has_more"] is False
    relayed = [line for line in page["data"] if line["path"] == "/v1/chat/completions"]
    assert [line["request_id"] for line in relayed] == ids[::-1]
    newest = relayed[0]
    assert newest["time"].endswith("Z") and newest["time"] >= relayed[-1]["time"]
    assert {key: newest[key] for key in ("method", "status", "key", "key_id", "key_name", "model", "backend")} == {
        "method": "POST",
        "status": 200,
        "key": f"{sent.bob['id']}(bob)",
        "key_id": sent.bob["id"],
        "key_name": "bob",
        "model": "sim",
        "backend": "sim",
    }
    assert newest["prompt_tokens"] > 0 and newest["completion_tokens"] == 3 and newest["duration_ms"] > 0
    assert newest["queue_ms"] is None and newest["wake_ms"] is None
    refused = relayed[1]
    assert (refused["status"], refused["model"], refused["backend"], refused["prompt_tokens"]) == (
        404,
        "no-such-model",
        None,
        None,
    )


def test_lines_are_filtered_by_key_name_or_id_model_and_status(sent: Sent) -> None:
    gateway, ids = sent.gateway, sent.ids
    assert ids_of(gateway, key="alice") == ids[2::-1]
    assert ids_of(gateway, key=sent.alice["id"]) == ids[2::-1]
    assert ids_of(gateway, key="bob") == [ids[3]]
    # A model by its name or an alias: lines name it as their request did.
    assert ids_of(gateway, model="sim") == [ids[3], ids[1], ids[0]]
    assert ids_of(gateway, model="sim-alias") == [ids[3], ids[1], ids[0]]
    assert ids_of(gateway, status="404") == [ids[2]]
    assert ids_of(gateway, status="4xx") == [ids[2]]
    assert ids_of(gateway, status="2xx", key="alice", model="sim") == [ids[1], ids[0]]
    assert ids_of(gateway, status="5xx") == []
    assert ids_of(gateway, key="nobody") == []
    # Empty values are no filter (a form sends them so).
    assert ids_of(gateway, key="", model="", status="", limit="") == ids[::-1]


def test_a_limit_keeps_the_newest_and_says_there_are_more(sent: Sent) -> None:
    gateway, ids = sent.gateway, sent.ids
    page = requests(gateway, model="sim", limit=2).json()
    assert [line["request_id"] for line in page["data"]] == [ids[3], ids[1]] and page["has_more"] is True
    assert requests(gateway, model="sim", limit=3).json()["has_more"] is False


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "600"}, "status"),
        ({"status": "ok"}, "status"),
    ],
)
def test_a_bad_limit_or_status_is_a_400_naming_it(sent: Sent, params: dict, param: str) -> None:
    gateway = sent.gateway
    response = requests(gateway, **params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert requests(gateway, limit=1000).status_code == 200


def test_no_line_is_answered_with_a_key_in_it(sent: Sent) -> None:
    gateway = sent.gateway
    secret = str(sent.alice["key"])
    # A key where a client may put one: the query (never logged), the path, the model's name.
    with gateway.http() as client:
        assert client.get(f"/v1/models/{secret}", params={"api_key": secret}).status_code == 404
    # (Not a chat completion: the other tests' lines are those.)
    request_id = post(gateway, secret, secret, path="/v1/completions")
    # And a line the gateway did not write (an older version's, or one written by hand).
    with gateway.log_path.open("a") as log:
        log.write(f"2026-01-01 00:00:00,000 INFO access rid=x GET /v1/{secret} status=200 duration_ms=1.0 ")
        log.write("key=- model=- backend=-\n")
    wait_until(lambda: request_id in gateway.log_path.read_text(), timeout=10)
    response = requests(gateway, limit=1000)
    assert response.status_code == 200 and secret not in response.text and secret[:12] not in response.text
    planted = next(line for line in response.json()["data"] if line["request_id"] == "x")
    assert planted["path"] == "/v1/sk-***"


# -- the log read back --


def write_lines(path: Path, count: int) -> None:
    with path.open("w") as log:
        for index in range(count):
            log.write(
                f"2026-11-25 15:43:15,{index % 1000:03d} INFO access rid=r{index} POST /v1/chat/completions "
                f"status={200 if index % 2 else 503} duration_ms=1.0 key=key_{index % 3}(k{index % 3}) "
                f"model=m backend=m prompt_tokens=1 completion_tokens=2\n"
            )
            log.write("2026-11-25 15:43:15,000 INFO vllm_gateway.health backend m (m) is now ready: ok\n")


def test_a_scan_stops_at_its_bound_and_says_older_lines_were_left(tmp_path: Path) -> None:
    path = tmp_path / "vllm_api_server.log"
    write_lines(path, 2000)
    found, has_more = find_requests([path], RequestFilter(key="key_1"), 5000, scan_bytes=20_000)
    assert 0 < len(found) < 667 and has_more is True
    assert found[0]["request_id"] == "r1999" and all(line["key_id"] == "key_1" for line in found)
    every, has_more = find_requests([path, tmp_path / "no-rotated-copy"], RequestFilter(), 5000, 10**9)
    assert len(every) == 2000 and has_more is False


def test_the_rotated_copy_continues_the_log(tmp_path: Path) -> None:
    write_lines(tmp_path / "log.1", 3)
    write_lines(tmp_path / "log", 2)
    found, _ = find_requests([tmp_path / "log", tmp_path / "log.1"], RequestFilter(status="5xx"), 10, 10**6)
    assert [line["request_id"] for line in found] == ["r0", "r2", "r0"]


def test_a_line_as_the_log_writer_escapes_it_reads_back_as_it_was() -> None:
    path, model = '/v1/a b"c\\é', 'my "model"'
    line = (
        f"2026-11-25 15:43:15,005 INFO access rid=x GET {escape(path)} status=401 duration_ms=0.8 "
        f"key={key_label('key_1', 'a name')} model={escape(model)} backend=- queue_ms=3.5 wake_ms=1.0"
    )
    entry = parse(line)
    assert entry is not None
    assert (entry["path"], entry["model"], entry["key_id"], entry["key_name"]) == (path, model, "key_1", "a name")
    assert (entry["status"], entry["backend"], entry["queue_ms"], entry["wake_ms"]) == (401, None, 3.5, 1.0)
    assert parse("2026-11-25 15:43:15,005 INFO access rid=x GET /") is None  # cut short
