"""GET /admin/overview over a real gateway and simulator: each model's requests in flight and waiting
against its capacity, tokens per second, TTFT quantiles, and requests and tokens per minute, as the
requests sent make them; admin keys only. Also the history's arithmetic (console_figures.py)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.support.chat import chat_body
from tests.support.clients import client_tls
from tests.support.gateway import Backend, Gateway
from tests.support.processes import wait_until
from vllm_gateway.console_figures import COUNTERS, REQ, TOKENS, TTFT, FigureHistory, Reading, histogram_quantile

CONSOLE_PATHS = ["/admin/overview", "/admin/models/sim", "/admin/requests"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, simulator):
    backend = Backend("sim", simulator.base_url, path="/models/sim", aliases="sim-alias", max_concurrency="1")
    env = {"GATEWAY_CONSOLE_SAMPLE_SECONDS": "0.2"}
    with Gateway.start(tmp_path_factory.mktemp("overview"), [backend], env=env) as gateway:
        yield gateway


def overview(gateway: Gateway) -> dict:
    headers = {"Authorization": f"Bearer {gateway.admin_key}"}
    response = httpx.get(f"{gateway.url}/admin/overview", headers=headers, verify=client_tls())
    assert response.status_code == 200, response.text
    return response.json()


def sim(page: dict) -> dict:
    return next(model for model in page["models"] if model["model"] == "sim")


def by_minute(series: dict, model: str, what: str) -> dict[int, int]:
    """{minute start (unix s): count} of one model's row."""
    return {series["start"] + 60 * index: count for index, count in enumerate(series[what][model])}


def chat(gateway: Gateway, model: str = "sim", max_tokens: int = 5) -> int:
    """One chat completion; its tokens (prompt + completion) as its usage says."""
    answer = gateway.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello there"}], max_tokens=max_tokens
    )
    assert answer.usage is not None
    return answer.usage.total_tokens


def test_the_minute_rows_count_exactly_the_requests_and_tokens_sent(gateway: Gateway) -> None:
    before = overview(gateway)["per_minute"]["hour"]
    first_minute = int(time.time() // 60) * 60
    tokens = chat(gateway) + chat(gateway, "sim-alias", max_tokens=7) + chat(gateway, max_tokens=3)
    last_minute = int(time.time() // 60) * 60

    def counted() -> dict | None:
        page = overview(gateway)
        hour = page["per_minute"]["hour"]
        added = sum(hour["requests"]["sim"]) - sum(before["requests"]["sim"])
        return page if added >= 3 else None

    page = wait_until(counted, timeout=10)
    hour, day = page["per_minute"]["hour"], page["per_minute"]["day"]
    requests_now, requests_then = by_minute(hour, "sim", "requests"), by_minute(before, "sim", "requests")
    tokens_now, tokens_then = by_minute(hour, "sim", "tokens"), by_minute(before, "sim", "tokens")
    # The minutes the requests were sent in hold them all, exactly: 3 requests, their usage's tokens.
    sent_in = range(first_minute, last_minute + 60, 60)
    assert sum(requests_now[m] - requests_then.get(m, 0) for m in sent_in) == 3
    assert sum(tokens_now[m] - tokens_then.get(m, 0) for m in sent_in) == tokens
    assert all(requests_now[m] == requests_then.get(m, 0) for m in requests_now if m not in sent_in)
    # The hour is the day's last 60 minutes, both ending with the current minute.
    current = int(page["generated_at"] // 60) * 60
    assert (hour["step_s"], len(hour["requests"]["sim"]), hour["start"]) == (60, 60, current - 59 * 60)
    assert (day["step_s"], len(day["tokens"]["sim"]), day["start"]) == (60, 1440, current - 1439 * 60)
    assert day["requests"]["sim"][-60:] == hour["requests"]["sim"]
    assert day["tokens"]["sim"][-60:] == hour["tokens"]["sim"]


def stream(gateway: Gateway, max_tokens: int) -> None:
    """A streamed chat completion, read to its end (the metrics time the first token of streams only)."""
    chunks = gateway.openai().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, stream=True
    )
    assert len(list(chunks)) >= max_tokens


def test_tokens_per_second_and_ttft_quantiles_follow_the_requests(gateway: Gateway) -> None:
    stream(gateway, max_tokens=20)
    model = wait_until(lambda: (m := sim(overview(gateway)))["ttft_p50_ms"] is not None and m, timeout=10)
    assert model["tokens_per_second"] > 0
    assert 0 < model["ttft_p50_ms"] <= model["ttft_p99_ms"] <= 60_000


def test_in_flight_and_waiting_show_requests_held_against_the_capacity(gateway: Gateway, simulator) -> None:
    simulator.set_faults(slow_start=3.0)  # each request holds the server's one place for 3 s
    threads = [threading.Thread(target=chat, args=(gateway,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        model = wait_until(lambda: (m := sim(overview(gateway)))["waiting"] == 2 and m, timeout=10)
        assert (model["in_flight"], model["capacity"], model["status"]) == (1, 1, "ready")
        server = model["backends"][0]
        assert (server["id"], server["in_flight"], server["capacity"], server["status"]) == ("sim", 1, 1, "ready")
        assert (server["url"], server["device"], server["gpus"], server["cpus"]) == (simulator.base_url, "gpu", "", "")
    finally:
        simulator.clear_faults()
        for thread in threads:
            thread.join(timeout=30)
    model = wait_until(lambda: (m := sim(overview(gateway)))["in_flight"] == 0 and m, timeout=10)
    assert model["waiting"] == 0


def test_with_two_workers_either_one_answers_for_the_whole_gateway(tmp_path, simulator, redis_url: str) -> None:
    env = {"GATEWAY_WORKERS": "2", "GATEWAY_RATE_LIMIT_STORAGE": redis_url, "GATEWAY_CONSOLE_SAMPLE_SECONDS": "0.2"}
    backend = Backend("sim", simulator.base_url, path="/models/sim")
    with Gateway.start(tmp_path / "gw", [backend], env=env) as gateway:
        # A connection each: the kernel spreads them, and the polls below, over both workers.
        headers = {"Authorization": f"Bearer {gateway.key}"}
        body = chat_body("sim", max_tokens=2)
        for _ in range(12):
            assert httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers).status_code == 200

        seen: list[int] = []

        def requests_counted() -> int:
            seen.append(sum(overview(gateway)["per_minute"]["hour"]["requests"]["sim"]))
            return seen[-1]

        # A worker sees the other's requests in its last snapshot, up to GATEWAY_METRICS_SNAPSHOT_SECONDS
        # old: a poll may find the other worker's last request not counted yet, but never one twice.
        wait_until(lambda: [requests_counted() for _ in range(10)] == [12] * 10, timeout=15)
        assert max(seen) == 12  # whichever worker answered, none counted a request twice


@pytest.mark.parametrize("path", CONSOLE_PATHS)
def test_the_console_data_is_for_admin_keys_only(gateway: Gateway, path: str) -> None:
    refused = httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {gateway.key}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"
    anonymous = httpx.get(gateway.url + path)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "invalid_request_error"


# -- the history's arithmetic --


def reading(at: float, requests: float, tokens: float, ttft: list[float] | None = None) -> Reading:
    counters = [0.0] * COUNTERS
    counters[REQ], counters[TOKENS] = requests, tokens
    for index, count in enumerate(ttft or []):
        counters[TTFT + index] = count
    return Reading(at, {"m": counters})


def test_a_quantile_is_interpolated_in_its_bucket_as_prometheus_does() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert histogram_quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert histogram_quantile(0.5, bounds, [2, 2, 0, 0]) == pytest.approx(0.1)  # the rank ends bucket one
    assert histogram_quantile(0.75, bounds, [2, 2, 0, 0]) == pytest.approx(0.15)
    assert histogram_quantile(0.5, bounds, [0, 0, 4, 0]) == pytest.approx(0.3)
    assert histogram_quantile(0.99, bounds, [1, 0, 0, 9]) == 0.4  # above every bound: the last bound


def test_the_history_puts_counts_in_their_minute_and_forgets_what_is_a_day_old() -> None:
    history = FigureHistory(sample_seconds=2)
    start = 1_800_000_000 // 60 * 60  # a minute's start
    history.add(reading(start + 1, 0, 0), ["m"])
    history.add(reading(start + 30, 2, 20), ["m"])
    history.add(reading(start + 61, 5, 50), ["m"])
    now = reading(start + 62, 6, 60)  # one request since the last reading: in the current minute
    hour = history.per_minute(now, ["m"])["hour"]
    assert hour["requests"]["m"][-2:] == [2, 4] and hour["tokens"]["m"][-2:] == [20, 40]
    # A day later the same slots hold the new day's minutes only.
    history.add(reading(start + 86_400 + 1, 7, 70), ["m"])
    day = history.per_minute(reading(start + 86_400 + 2, 7, 70), ["m"])["day"]
    # The day's window: the minute after `start` (3; the unread 1 was never a reading) and the newest (2).
    assert sum(day["requests"]["m"]) == 3 + 2 and sum(day["tokens"]["m"]) == 30 + 20


def test_counts_a_worker_took_with_it_never_make_a_minute_negative() -> None:
    history = FigureHistory(sample_seconds=2)
    history.add(reading(120, 10, 100), ["m"])
    history.add(reading(121, 4, 40), ["m"])  # a worker's counts went with it
    history.add(reading(122, 5, 45), ["m"])
    assert history.per_minute(reading(123, 5, 45), ["m"])["hour"]["requests"]["m"][-1] == 1
