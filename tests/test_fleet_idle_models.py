"""Idle models: a server with idle=stop or idle=sleep that no request used for its idle_after stops
or sleeps, and the next request through the gateway wakes it and succeeds, as do the requests that
arrive meanwhile, in their fair order. Real scripts, supervisor and gateway; simulated models."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.chat import chat_body
from tests.support.fleet import Fleet, gateway_get, gateway_metrics, live, two_simulated_models
from tests.support.processes import wait_until


def make_fleet(tmp_path: Path, beta_args: str) -> Fleet:
    return two_simulated_models(tmp_path, f"max_concurrency=1 {beta_args}")


@pytest.fixture
def stopping_fleet(tmp_path: Path):
    fleet = make_fleet(tmp_path, "idle=stop idle_after=2 simulate_args='--startup-delay 1'")
    yield fleet
    fleet.stop_everything()


@pytest.fixture
def sleeping_fleet(tmp_path: Path):
    fleet = make_fleet(tmp_path, "idle=sleep idle_after=2 simulate_args='--sleep-seconds 0.3 --wake-seconds 1'")
    yield fleet
    fleet.stop_everything()


def chat(port: int, key: str, model: str = "beta", max_tokens: int = 3) -> tuple[int, dict]:
    body = chat_body(model, max_tokens=max_tokens)
    return post(port, key, "/v1/chat/completions", body)


def post(port: int, key: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a POST through the gateway, errors included."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode() if body is not None else b"",
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def model_health(port: int, key: str, model: str = "beta") -> dict:
    return next(m for m in gateway_get(port, key, "/health")["models"] if m["id"] == model)


def waiting(port: int, key: str, model: str = "beta") -> int:
    return int(model_health(port, key, model)["waiting"])


def access_lines(fleet: Fleet, model: str = "beta") -> list[str]:
    path = fleet.log_dir / "vllm_api_server.log"
    text = path.read_text() if path.exists() else ""
    return [line for line in text.splitlines() if " access " in line and f" model={model} " in line]


def test_an_idle_model_with_idle_stop_stops_and_the_next_request_starts_it_again(stopping_fleet: Fleet) -> None:
    fleet = stopping_fleet
    gateway_port, key = fleet.start_with_gateway()
    first = next(e["pid"] for e in fleet.events("beta") if e["event"] == "start")

    wait_until(lambda: fleet.supervised_state("beta") == "stopped", timeout=20)
    # Gone, and seen gone by the supervisor, which removes its PID file then.
    wait_until(lambda: not live({first}) and not (fleet.run_dir / "beta.pid").exists(), timeout=10)
    wait_until(lambda: model_health(gateway_port, key)["status"] == "stopped", timeout=10)
    assert model_health(gateway_port, key, "alpha")["status"] == "ready"  # idle=none: never stops
    status = fleet.run("status_all_services.sh")
    assert status.returncode == 0, status.stdout  # stopped as idle is as it should be
    assert re.search(r"^beta\s+stopped\(simulated\)\s", status.stdout, re.M) or re.search(
        r"^beta\s+stopped\s", status.stdout, re.M
    ), status.stdout
    stopped = [e for e in fleet.events("beta") if e["event"] == "stopped"]
    assert stopped and stopped[-1]["detail"].startswith("idle:")
    assert not [e for e in fleet.events("beta") if e["event"] == "exit"]  # no crash, no backoff

    answer, body = chat(gateway_port, key)
    assert answer == 200, body
    assert body["choices"][0]["message"]["content"]
    again = fleet.pid("beta")
    assert again != first and live({again})
    started = [e for e in fleet.events("beta") if e["event"] == "start"][-1]
    assert started["detail"] == "on demand, after an idle stop" and started["restarts"] == 0
    woke = [e for e in fleet.events("beta") if e["event"] == "wake"]
    assert len(woke) == 1 and woke[0]["seconds"] >= 1.0  # its --startup-delay at least
    line = wait_until(lambda: [line for line in access_lines(fleet) if "wake_ms=" in line], timeout=5)[0]
    wake_ms = float(re.search(r" wake_ms=([0-9.]+)", line).group(1))
    assert " status=200 " in line and wake_ms >= 1000
    assert float(re.search(r" queue_ms=([0-9.]+)", line).group(1)) >= wake_ms
    scraped = gateway_metrics(gateway_port)
    assert 'vllm_gateway_backend_wake_seconds_count{model="beta",backend="beta"} 1' in scraped
    assert 'vllm_gateway_backend_wake_seconds_bucket{model="beta",backend="beta",le="0.5"} 0' in scraped


def test_requests_that_arrive_while_a_model_wakes_all_succeed_in_their_fair_order(stopping_fleet: Fleet) -> None:
    fleet = stopping_fleet
    gateway_port, admin = fleet.start_with_gateway()
    light = post(gateway_port, admin, "/admin/keys", {"name": "light"})[1]["key"]
    heavy = post(gateway_port, admin, "/admin/keys", {"name": "heavy", "weight": 2})[1]["key"]
    wait_until(lambda: fleet.supervised_state("beta") == "stopped", timeout=20)
    wait_until(lambda: model_health(gateway_port, admin)["status"] == "stopped", timeout=10)

    order: list[str] = []
    statuses: list[int] = []

    def one(name: str, key: str) -> None:
        status, _ = chat(gateway_port, key, max_tokens=20)
        statuses.append(status)
        order.append(name)

    threads = []
    for name, key, before in (("A", light, 0), ("B", heavy, 3)):
        for _ in range(3):
            thread = threading.Thread(target=one, args=(name, key))
            thread.start()
            threads.append(thread)
        wait_until(lambda before=before: waiting(gateway_port, admin) == before + 3, timeout=10)
    assert fleet.supervised_state("beta") in ("stopped", "waking")  # all six arrived before it was back
    for thread in threads:
        thread.join(timeout=60)

    assert statuses == [200] * 6
    # One at a time (max_concurrency=1), by deficit round robin: A's turn one, B's turn two.
    assert "".join(order) == "ABBABA"
    assert len([e for e in fleet.events("beta") if e["event"] == "start"]) == 2  # the first start, one wake


def test_a_request_waits_no_longer_than_the_queue_timeout_for_a_wake(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, "idle=stop idle_after=1 simulate_args='--startup-delay 8'")
    try:
        gateway_port, key = fleet.start_with_gateway(env={"GATEWAY_QUEUE_TIMEOUT": "2"})
        wait_until(lambda: model_health(gateway_port, key)["status"] == "stopped", timeout=20)
        started = time.monotonic()
        status, body = chat(gateway_port, key)
        assert (status, body["error"]["code"]) == (503, "queue_timeout"), body
        assert time.monotonic() - started < 6
        # The wake goes on without it: the next request finds the model ready.
        wait_until(lambda: model_health(gateway_port, key)["status"] == "ready", timeout=30)
        assert chat(gateway_port, key)[0] == 200
    finally:
        fleet.stop_everything()


def test_a_sleeping_model_keeps_its_process_and_wakes_for_the_next_request(sleeping_fleet: Fleet) -> None:
    fleet = sleeping_fleet
    gateway_port, key = fleet.start_with_gateway()
    server = fleet.pid("beta")
    base = f"http://127.0.0.1:{fleet.ports[1]}"

    wait_until(lambda: fleet.supervised_state("beta") == "sleeping", timeout=20)
    wait_until(lambda: [e for e in fleet.events("beta") if e["event"] == "sleep"], timeout=10)
    with urllib.request.urlopen(f"{base}/is_sleeping", timeout=5) as answer:
        assert json.loads(answer.read()) == {"is_sleeping": True}
    wait_until(lambda: model_health(gateway_port, key)["status"] == "sleeping", timeout=10)
    listed = {m["id"]: m["status"] for m in gateway_get(gateway_port, key, "/v1/models")["data"]}
    assert listed == {"alpha": "ready", "beta": "sleeping"}
    status = fleet.run("status_all_services.sh")
    assert re.search(r"^beta\s+sleeping", status.stdout, re.M), status.stdout

    answer, body = chat(gateway_port, key)
    assert answer == 200, body
    assert fleet.pid("beta") == server  # the same process: woken, not started again
    with urllib.request.urlopen(f"{base}/is_sleeping", timeout=5) as answer:
        assert json.loads(answer.read()) == {"is_sleeping": False}
    woke = [e for e in fleet.events("beta") if e["event"] == "wake"]
    assert len(woke) == 1 and woke[0]["seconds"] >= 1.0 and woke[0]["mode"] == "sleep"
    line = wait_until(lambda: [line for line in access_lines(fleet) if "wake_ms=" in line], timeout=5)[0]
    assert float(re.search(r" wake_ms=([0-9.]+)", line).group(1)) >= 1000
    assert 'vllm_gateway_backend_wake_seconds_count{model="beta",backend="beta"} 1' in gateway_metrics(gateway_port)
    assert not [e for e in fleet.events("beta") if e["event"] in ("exit", "restart", "hang")]


def test_a_new_supervisor_leaves_a_sleeping_model_asleep_until_a_request_comes(sleeping_fleet: Fleet) -> None:
    fleet = sleeping_fleet
    gateway_port, key = fleet.start_with_gateway()
    server = fleet.pid("beta")
    wait_until(lambda: fleet.supervised_state("beta") == "sleeping", timeout=20)
    supervisor = int((fleet.run_dir / "supervisor.pid").read_text().split()[0])
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: not live({supervisor}), timeout=5)

    again = fleet.run("start_all_models.sh", "--simulate")
    assert again.returncode == 0, again.stderr
    wait_until(lambda: [e for e in fleet.events("beta") if e["event"] == "adopted"], timeout=10)
    time.sleep(1.0)  # two looks of the new supervisor
    assert fleet.supervised_state("beta") == "sleeping" and fleet.pid("beta") == server

    assert chat(gateway_port, key)[0] == 200
    assert fleet.pid("beta") == server


def test_admins_put_a_model_to_sleep_and_wake_it_over_the_api_and_the_cli(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, "idle=sleep idle_after=1h simulate_args='--sleep-seconds 0.2 --wake-seconds 0.5'")
    try:
        gateway_port, key = fleet.start_with_gateway()
        status, slept = post(gateway_port, key, "/admin/models/beta/sleep")
        assert (status, slept["output"]) == (200, ["beta is sleeping"]), slept
        status, twice = post(gateway_port, key, "/admin/models/beta/sleep")
        assert (status, twice["error"]["code"]) == (409, "model_not_ready"), twice
        assert twice["error"]["message"] == "`beta` is sleeping: only a ready model sleeps."

        status, woken = post(gateway_port, key, "/admin/models/beta/wake")
        assert (status, woken["output"]) == (200, ["beta is ready"]), woken
        status, awake = post(gateway_port, key, "/admin/models/beta/wake")
        assert (status, awake["error"]["code"]) == (409, "model_not_sleeping"), awake
        status, never = post(gateway_port, key, "/admin/models/alpha/sleep")
        assert (status, never["error"]["code"]) == (409, "idle_not_configured"), never
        assert "idle=sleep or idle=stop" in never["error"]["message"]

        cli = fleet.cli("models", "sleep", "beta")
        assert (cli.returncode, cli.stdout) == (0, "beta is sleeping\n"), cli.stderr
        assert fleet.supervised_state("beta") == "sleeping"
        cli = fleet.cli("models", "wake", "beta")
        assert (cli.returncode, cli.stdout) == (0, "beta is ready\n"), cli.stderr
        cli = fleet.cli("models", "wake", "beta")
        assert cli.returncode == 2 and "not asleep" in cli.stderr

        wakes = [e for e in fleet.events("beta") if e["event"] == "wake"]
        assert len(wakes) == 2
        stopped = post(gateway_port, key, "/admin/models/beta/sleep")
        assert stopped[0] == 200
        status, _ = post(gateway_port, key, "/admin/models/beta/stop")  # a sleeping model can be stopped
        assert status == 200 and not (fleet.run_dir / "beta.pid").exists()
    finally:
        fleet.stop_everything()


@pytest.mark.parametrize("admission", ["off", "two workers sharing Redis"])
def test_a_request_wakes_a_stopped_model_with_admission_off_and_across_workers(
    tmp_path: Path, admission: str, request: pytest.FixtureRequest
) -> None:
    if admission == "off":
        env = {"GATEWAY_ADMISSION": "false"}
    else:
        env = {"GATEWAY_WORKERS": "2", "GATEWAY_RATE_LIMIT_STORAGE": request.getfixturevalue("redis_url")}
    fleet = make_fleet(tmp_path, "idle=stop idle_after=2 simulate_args='--startup-delay 1'")
    try:
        gateway_port, key = fleet.start_with_gateway(env=env)
        wait_until(lambda: model_health(gateway_port, key)["status"] == "stopped", timeout=20)
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(chat(gateway_port, key)[0])) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert results == [200] * 4
        assert len([e for e in fleet.events("beta") if e["event"] == "wake"]) == 1  # one wake for them all
    finally:
        fleet.stop_everything()


def test_a_model_stopped_since_the_gateways_last_look_is_woken_not_reported_unreachable(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, "idle=stop idle_after=15 simulate_args='--startup-delay 1'")
    try:
        # The gateway looks every 60 s: it still takes beta for ready when the request comes. A first
        # request, just after the gateway's first look, starts beta's idle time from there, however
        # long the start took on a loaded machine.
        gateway_port, key = fleet.start_with_gateway(env={"GATEWAY_HEALTH_INTERVAL": "60"})
        assert chat(gateway_port, key)[0] == 200
        wait_until(lambda: fleet.supervised_state("beta") == "stopped", timeout=40)
        wait_until(lambda: not (fleet.run_dir / "beta.pid").exists(), timeout=10)
        assert model_health(gateway_port, key)["status"] == "ready"
        status, body = chat(gateway_port, key)
        assert status == 200, body
        assert [e["event"] for e in fleet.events("beta")][-2:] == ["ready", "wake"]
    finally:
        fleet.stop_everything()
