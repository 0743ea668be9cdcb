"""GET /admin/events: the supervisor's event log, filtered by model, kind and time, for admin keys."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.gateway import Backend, Gateway
from vllm_gateway.event_log import FLEET_EVENT_FILE, EventQuery, find_events

EVENTS = [
    {"time": "2026-12-03T06:00:00.000Z", "event": "start", "model": "alpha", "pid": 10},
    {"time": "2026-12-03T06:00:05.000Z", "event": "ready", "model": "alpha", "pid": 10},
    {"time": "2026-12-03T06:10:00.000Z", "event": "exit", "model": "alpha", "pid": 10, "signal": "SIGKILL"},
    {"time": "2026-12-03T06:10:01.000Z", "event": "restart", "model": "alpha", "pid": 11},
    {"time": "2026-12-03T07:00:00.000Z", "event": "start", "model": "beta", "pid": 20},
]
SIX_TEN = 1796278200  # 2026-12-03T06:10:00Z


def write_events(directory: Path, lines: list[str] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = lines if lines is not None else [json.dumps(event) for event in EVENTS]
    (directory / FLEET_EVENT_FILE).write_text("".join(f"{line}\n" for line in text))


def times(page: dict) -> list[str]:
    return [event["time"][11:19] for event in page["data"]]


def test_events_are_filtered_by_model_kind_and_time_oldest_first(tmp_path: Path) -> None:
    write_events(tmp_path)
    assert times(find_events(tmp_path / FLEET_EVENT_FILE, EventQuery())) == [
        "06:00:00",
        "06:00:05",
        "06:10:00",
        "06:10:01",
        "07:00:00",
    ]
    assert times(find_events(tmp_path / FLEET_EVENT_FILE, EventQuery(match=[(("model",), ["beta"])]))) == ["07:00:00"]
    assert times(find_events(tmp_path / FLEET_EVENT_FILE, EventQuery(match=[(("event",), ["exit", "restart"])]))) == [
        "06:10:00",
        "06:10:01",
    ]
    # since inclusive, until exclusive
    assert times(find_events(tmp_path / FLEET_EVENT_FILE, EventQuery(since=SIX_TEN, until=SIX_TEN + 3000))) == [
        "06:10:00",
        "06:10:01",
    ]


def test_a_limit_keeps_the_newest_and_says_there_are_more(tmp_path: Path) -> None:
    write_events(tmp_path)
    page = find_events(tmp_path / FLEET_EVENT_FILE, EventQuery(limit=2))
    assert times(page) == ["06:10:01", "07:00:00"] and page["has_more"] is True
    assert find_events(tmp_path / FLEET_EVENT_FILE, EventQuery(limit=5))["has_more"] is False


def test_a_cut_line_is_skipped_and_no_file_means_no_events(tmp_path: Path) -> None:
    write_events(tmp_path, [json.dumps(EVENTS[0]), '{"time": "2026-12-03T06:00:0', "[1, 2]", json.dumps(EVENTS[1])])
    assert times(find_events(tmp_path / FLEET_EVENT_FILE, EventQuery())) == ["06:00:00", "06:00:05"]
    assert find_events(tmp_path / "nowhere" / FLEET_EVENT_FILE, EventQuery()) == {
        "object": "list",
        "data": [],
        "has_more": False,
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("events")
    write_events(workdir / "fleet-logs")
    with Gateway.start(
        workdir,
        [Backend("alpha", "http://127.0.0.1:9")],
        env={"VLLM_LOG_DIR": str(workdir / "fleet-logs")},
        wait_ready=False,
    ) as gateway:
        yield gateway


def get(gateway: Gateway, key: str, **params: object) -> httpx.Response:
    return httpx.get(
        f"{gateway.url}/admin/events", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )


def test_admins_read_the_events_over_http_with_their_filters(gateway: Gateway) -> None:
    every = get(gateway, gateway.admin_key)
    assert every.status_code == 200 and len(every.json()["data"]) == 5
    page = get(gateway, gateway.admin_key, model="alpha", event="exit,restart", since="2026-12-03T06:05:00Z")
    assert [event["event"] for event in page.json()["data"]] == ["exit", "restart"]
    assert page.json()["data"][0]["signal"] == "SIGKILL"
    assert times(get(gateway, gateway.admin_key, until=SIX_TEN).json()) == ["06:00:00", "06:00:05"]


def test_events_are_for_admin_keys_only(gateway: Gateway) -> None:
    assert get(gateway, gateway.key).status_code == 403
    assert httpx.get(f"{gateway.url}/admin/events", timeout=10).status_code == 401


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        ({"since": "yesterday"}, "since", "since must be unix seconds or an ISO 8601 time"),
        ({"until": "-5"}, "until", "until must be unix seconds or an ISO 8601 time"),
        ({"limit": "0"}, "limit", "limit must be a whole number from 1 to 10000."),
        ({"limit": "10001"}, "limit", "limit must be a whole number from 1 to 10000."),
        ({"limit": "²"}, "limit", "limit must be a whole number from 1 to 10000."),
    ],
)
def test_a_bad_filter_is_a_400_naming_it(gateway: Gateway, params: dict, param: str, message: str) -> None:
    response = get(gateway, gateway.admin_key, **params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and message in error["message"]
