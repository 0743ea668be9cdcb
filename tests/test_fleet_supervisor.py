"""The supervisor behind start_all_models.sh: crashed, crash-looping and hung model servers, its own
death, and stops that leave nothing. Real scripts, a real supervisor process, simulated models."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.chat import chat_body
from tests.support.fleet import Fleet, gateway_get, gateway_metrics, live, two_simulated_models
from tests.support.processes import http_status, process_tree, wait_until


def make_fleet(tmp_path: Path, beta_args: str = "") -> Fleet:
    return two_simulated_models(tmp_path, beta_args)


@pytest.fixture
def fleet(tmp_path: Path):
    fleet = make_fleet(tmp_path)
    yield fleet
    fleet.stop_everything()


def moment(event: dict) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def healthy_with_new_pid(fleet: Fleet, model: str, old_pid: int, port: int) -> int | None:
    try:
        pid = fleet.pid(model)
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid != old_pid and http_status(f"http://127.0.0.1:{port}/health") == 200 else None


def test_a_killed_model_server_comes_back_after_its_backoff_and_answers_again(fleet: Fleet) -> None:
    started = fleet.run("start_all_models.sh", "--simulate", "--wait")
    assert started.returncode == 0, started.stderr
    old = fleet.pid("alpha")
    tree = process_tree(old) | {old}
    os.kill(old, signal.SIGKILL)

    new = wait_until(lambda: healthy_with_new_pid(fleet, "alpha", old, fleet.ports[0]), timeout=20)
    assert live(tree) == set()
    exit_event, restart = [e for e in fleet.events("alpha") if e["event"] in ("exit", "restart")]
    assert exit_event["signal"] == "SIGKILL" and exit_event["pid"] == old
    assert exit_event["delay"] == 0.5
    assert moment(restart) - moment(exit_event) >= 0.5
    assert restart["pid"] == new and restart["restarts"] == 1
    # the same command as the first start: simulated, on the same port, appended to the same log
    log = fleet.log("alpha.log")
    assert "supervisor restarts alpha (simulated)" in log
    wait_until(lambda: fleet.supervised_state("alpha") == "ready", timeout=10)  # its next check saw it
    status = fleet.run("status_all_services.sh")
    assert re.search(rf"^alpha\s+ready\(simulated\)\s+{new}\s+{fleet.ports[0]}\s+ok\s.*\s1\s+", status.stdout, re.M)
    assert http_status(f"http://127.0.0.1:{fleet.ports[1]}/health") == 200  # beta never noticed


def test_a_model_that_exits_on_its_own_is_restarted_and_its_exit_code_recorded(fleet: Fleet) -> None:
    assert fleet.run("start_all_models.sh", "--simulate", "--wait", "beta").returncode == 0
    old = fleet.pid("beta")
    request = urllib.request.Request(
        f"http://127.0.0.1:{fleet.ports[1]}/_simulator/exit", data=b'{"code": 7}', method="POST"
    )
    assert urllib.request.urlopen(request, timeout=5).status == 202
    wait_until(lambda: healthy_with_new_pid(fleet, "beta", old, fleet.ports[1]), timeout=20)
    exit_event = next(e for e in fleet.events("beta") if e["event"] == "exit")
    assert exit_event["exit_code"] == 7 and exit_event["detail"] == "exit code 7"


def test_a_crash_loop_ends_in_failed_with_the_exit_code_and_the_log_until_started_again(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, beta_args="simulate_args='--exit-after 1.5 --exit-code 3'")
    fleet.env.update({"VLLM_RESTART_DELAY": "0.2", "VLLM_CRASH_LOOP_EXITS": "3", "VLLM_CRASH_LOOP_WINDOW": "60"})
    try:
        fleet.run("start_all_models.sh", "--simulate", "beta")
        wait_until(lambda: any(e["event"] == "failed" for e in fleet.events("beta")), timeout=30)
        seen = fleet.events("beta")
        exits = [e for e in seen if e["event"] == "exit"]
        assert [e["exit_code"] for e in exits] == [3, 3, 3]
        assert [e.get("delay") for e in exits] == [0.2, 0.4, None]  # doubling; none after the third
        assert [e["event"] for e in seen].count("restart") == 2
        assert not (fleet.run_dir / "beta.pid").exists()

        status = fleet.run("status_all_services.sh")
        assert status.returncode == 1
        assert re.search(r"^beta\s+failed\(simulated\)\s+-\s", status.stdout, re.M), status.stdout
        assert "beta: failed: 3 exits within 60s, the last: exit code 3" in status.stdout
        assert "exiting with code 3 after 1.5 s (--exit-after)" in status.stdout  # its log's last lines

        # Failed stays failed (no restart while we look) until someone starts it: then it runs again,
        # simulated as before without --simulate being repeated.
        count = len(fleet.events("beta"))
        time.sleep(1)  # two ticks of the supervisor and more: it would have restarted it by now
        again = fleet.run("start_all_models.sh", "beta")
        assert "beta last ran simulated: started simulated again" in again.stderr
        assert len([e for e in fleet.events("beta")[count:] if e["event"] == "start"]) == 1
        assert fleet.log("beta.log").startswith("==== ") and "starts beta (simulated) ====" in fleet.log("beta.log")
        assert fleet.log("beta.log.1").count("supervisor restarts beta (simulated)") == 2  # the failed run's log
    finally:
        fleet.stop_everything()


def test_a_hung_model_is_stopped_and_started_again(fleet: Fleet) -> None:
    assert fleet.run("start_all_models.sh", "--simulate", "--wait", "alpha").returncode == 0
    old = fleet.pid("alpha")
    faults = urllib.request.Request(
        f"http://127.0.0.1:{fleet.ports[0]}/_simulator/faults", data=b'{"health_status": 503}', method="POST"
    )
    urllib.request.urlopen(faults, timeout=5)
    assert live({old}) == {old}  # alive, but /health fails
    wait_until(lambda: healthy_with_new_pid(fleet, "alpha", old, fleet.ports[0]), timeout=30)
    kinds = [e["event"] for e in fleet.events("alpha")]
    assert kinds[kinds.index("hang") :][:3] == ["hang", "exit", "restart"]
    hang = next(e for e in fleet.events("alpha") if e["event"] == "hang")
    assert hang["detail"] == "/health failed 2 checks in a row"
    exit_event = next(e for e in fleet.events("alpha") if e["event"] == "exit")
    assert "stopped as hung" in exit_event["detail"]


def test_a_server_whose_health_never_answers_is_stopped_and_started_again(fleet: Fleet) -> None:
    # The usual hang of a stuck engine: the port takes the connection, /health never answers.
    fleet.env["VLLM_HEALTH_CHECK_INTERVAL"] = "0.5"
    assert fleet.run("start_all_models.sh", "--simulate", "--wait", "alpha").returncode == 0
    old = fleet.pid("alpha")
    faults = urllib.request.Request(
        f"http://127.0.0.1:{fleet.ports[0]}/_simulator/faults", data=b'{"slow_health": 3600}', method="POST"
    )
    urllib.request.urlopen(faults, timeout=5)
    wait_until(lambda: healthy_with_new_pid(fleet, "alpha", old, fleet.ports[0]), timeout=30)
    hang = next(e for e in fleet.events("alpha") if e["event"] == "hang")
    assert hang["detail"] == "/health failed 2 checks in a row" and hang["pid"] == old


def test_a_crash_is_seen_at_once_while_another_servers_health_check_hangs(fleet: Fleet) -> None:
    # alpha's check waits out its 5 s timeout; the supervisor must not wait with it to see beta die.
    fleet.env.update({"VLLM_HEALTH_CHECK_INTERVAL": "5", "VLLM_HANG_CHECKS": "1"})
    assert fleet.run("start_all_models.sh", "--simulate", "--wait").returncode == 0
    alpha, beta = fleet.pid("alpha"), fleet.pid("beta")
    simulator = f"http://127.0.0.1:{fleet.ports[0]}/_simulator"
    faults = urllib.request.Request(f"{simulator}/faults", data=b'{"slow_health": 3600}', method="POST")
    urllib.request.urlopen(faults, timeout=5)

    def health_checks() -> int:
        with urllib.request.urlopen(f"{simulator}/stats", timeout=5) as answer:
            return int(json.loads(answer.read())["requests"].get("/health", 0))

    before = health_checks()
    wait_until(lambda: health_checks() > before, timeout=10)  # alpha's next check has begun, and hangs
    os.kill(beta, signal.SIGKILL)
    wait_until(lambda: healthy_with_new_pid(fleet, "alpha", alpha, fleet.ports[0]), timeout=60)
    seen = [(e["model"], e["event"]) for e in fleet.events() if e["event"] in ("exit", "hang")]
    assert seen.index(("beta", "exit")) < seen.index(("alpha", "hang")), seen
    assert healthy_with_new_pid(fleet, "beta", beta, fleet.ports[1])


def test_a_killed_supervisor_leaves_the_models_serving_and_a_new_one_adopts_them(fleet: Fleet) -> None:
    assert fleet.run("start_all_models.sh", "--simulate", "--wait").returncode == 0
    pids = {model: fleet.pid(model) for model in ("alpha", "beta")}
    supervisor = int((fleet.run_dir / "supervisor.pid").read_text().split()[0])
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: not live({supervisor}), timeout=5)
    assert all(http_status(f"http://127.0.0.1:{port}/health") == 200 for port in fleet.ports)

    again = fleet.run("start_all_models.sh", "--simulate", "--wait")
    assert again.returncode == 0, again.stderr
    assert "alpha is already running" in again.stderr
    assert {model: fleet.pid(model) for model in pids} == pids  # no duplicate started
    adopted = [e for e in fleet.events() if e["event"] == "adopted"]
    assert sorted((e["model"], e["pid"]) for e in adopted) == sorted(pids.items())

    os.kill(pids["beta"], signal.SIGKILL)  # the new supervisor restarts what it adopted
    wait_until(lambda: healthy_with_new_pid(fleet, "beta", pids["beta"], fleet.ports[1]), timeout=20)
    exit_event = [e for e in fleet.events("beta") if e["event"] == "exit"][-1]
    assert "status unknown" in exit_event["detail"]  # not its child: the kernel tells only the parent


def test_stop_leaves_no_process_and_stops_the_supervisor_once_nothing_is_wanted(fleet: Fleet) -> None:
    assert fleet.run("start_all_models.sh", "--simulate", "--wait").returncode == 0
    supervisor = int((fleet.run_dir / "supervisor.pid").read_text().split()[0])
    trees = process_tree(fleet.pid("alpha")) | process_tree(fleet.pid("beta"))

    one = fleet.run("stop_all_models.sh", "alpha")
    assert one.returncode == 0, one.stderr
    assert live({supervisor}) == {supervisor}  # beta is still wanted
    time.sleep(1.5)  # three looks of the supervisor
    assert not (fleet.run_dir / "alpha.pid").exists()  # and alpha was not restarted

    rest = fleet.run("stop_all_models.sh")
    assert rest.returncode == 0, rest.stderr
    assert live(trees | {supervisor}) == set()
    assert fleet.pid_files() == []
    assert {e["model"] for e in fleet.events() if e["event"] == "stopped"} == {"alpha", "beta"}


def test_after_a_ready_spell_of_reset_after_the_backoff_starts_over(fleet: Fleet) -> None:
    fleet.env["VLLM_RESTART_RESET_AFTER"] = "1"
    assert fleet.run("start_all_models.sh", "--simulate", "--wait", "alpha").returncode == 0
    port = fleet.ports[0]
    for _ in range(2):
        old = fleet.pid("alpha")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda old=old: healthy_with_new_pid(fleet, "alpha", old, port), timeout=20)
        # The spell counts from when the supervisor saw it ready, which under load lags our own look.
        wait_until(lambda: fleet.supervised_state("alpha") == "ready", timeout=20)
        time.sleep(1.5)  # ready past VLLM_RESTART_RESET_AFTER
    delays = [e["delay"] for e in fleet.events("alpha") if e["event"] == "exit"]
    assert delays == [0.5, 0.5]  # not 0.5 then 1.0


def test_a_server_never_ready_within_the_start_timeout_is_restarted(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path, beta_args="simulate_args='--startup-delay 30'")
    fleet.env["VLLM_START_TIMEOUT"] = "2"
    try:
        assert fleet.run("start_all_models.sh", "--simulate", "beta").returncode == 0
        hang = wait_until(lambda: [e for e in fleet.events("beta") if e["event"] == "hang"], timeout=20)[0]
        assert hang["detail"] == "not ready 2s after its start"
        wait_until(lambda: [e for e in fleet.events("beta") if e["event"] == "restart"], timeout=20)
    finally:
        fleet.stop_everything()


def test_stop_and_status_work_from_what_runs_when_the_config_is_broken(fleet: Fleet) -> None:
    assert fleet.run("start_all_models.sh", "--simulate", "--wait").returncode == 0
    pids = {model: fleet.pid(model) for model in ("alpha", "beta")}
    trees = {model: process_tree(pid) for model, pid in pids.items()}
    fleet.config.write_text(
        fleet.config.read_text().replace("log=alpha.log", "log=alpha.log gpu_memory_utilization=O.55")
    )

    status = fleet.run("status_all_services.sh")
    assert status.returncode == 2
    assert "vllm_model_configs: model #1 (alpha): gpu_memory_utilization=O.55" in status.stderr
    for model, port in zip(("alpha", "beta"), fleet.ports, strict=True):
        assert re.search(rf"^{model}\s+ready\(simulated\)\s+{pids[model]}\s+{port}\s+ok\s", status.stdout, re.M)

    one = fleet.run("stop_all_models.sh", "beta")
    assert one.returncode == 0, one.stderr
    assert "gpu_memory_utilization=O.55" in one.stderr
    assert live(trees["beta"]) == set() and live(trees["alpha"])

    everything = fleet.run("stop_all_services.sh")
    assert everything.returncode == 0, everything.stderr
    assert live(trees["alpha"]) == set()
    assert fleet.pid_files() == []


def test_the_gateway_shows_a_restarting_model_and_answers_503_until_it_is_back(fleet: Fleet) -> None:
    fleet.env["VLLM_RESTART_DELAY"] = "4"
    gateway_port, key = fleet.start_with_gateway()
    killed = fleet.pid("beta")
    os.kill(killed, signal.SIGKILL)

    def beta() -> dict:
        return next(m for m in gateway_get(gateway_port, key, "/health")["models"] if m["id"] == "beta")

    seen = wait_until(lambda: beta() if beta()["status"] == "restarting" else None, timeout=10)
    assert seen["backends"][0]["detail"] == "killed by SIGKILL; restarts in 4s"
    scraped = gateway_metrics(gateway_port)
    assert 'vllm_gateway_backend_state{model="beta",backend="beta",state="restarting"} 1' in scraped
    assert 'vllm_gateway_backend_state{model="beta",backend="beta",state="ready"} 0' in scraped
    listed = {m["id"]: m["status"] for m in gateway_get(gateway_port, key, "/v1/models")["data"]}
    assert listed["beta"] == "restarting" and listed["alpha"] == "ready"
    chat = urllib.request.Request(
        f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
        data=json.dumps(chat_body("beta")).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(chat, timeout=10)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "10"
    assert "has no ready server right now (restarting)" in json.loads(refused.value.read())["error"]["message"]

    back = wait_until(lambda: beta() if beta()["status"] == "ready" else None, timeout=30)
    assert back["backends"][0]["restarts"] == 1
    assert 'vllm_gateway_backend_restarts{model="beta",backend="beta"} 1' in gateway_metrics(gateway_port)
    assert 'vllm_gateway_backend_restarts{model="alpha",backend="alpha"} 0' in gateway_metrics(gateway_port)


def test_a_killed_gateway_comes_back_and_the_models_never_notice(fleet: Fleet) -> None:
    gateway_port, key = fleet.start_with_gateway()
    models = {model: fleet.pid(model) for model in ("alpha", "beta")}
    gateway = fleet.pid("api_server")
    os.kill(gateway, signal.SIGKILL)

    wait_until(lambda: healthy_with_new_pid(fleet, "api_server", gateway, gateway_port), timeout=30)
    assert {model: fleet.pid(model) for model in models} == models

    def chat() -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
            data=json.dumps(chat_body("beta", max_tokens=3)).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return json.loads(answer.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError:
            return ""  # models not seen ready yet by the new gateway

    assert wait_until(chat, timeout=20, interval=0.2)
    exit_event = next(e for e in fleet.events("api_server") if e["event"] == "exit")
    assert exit_event["signal"] == "SIGKILL"
    # ... and the new gateway serves the event log the supervisor wrote about its predecessor
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway_port}/admin/events?model=api_server&event=exit,restart",
        headers={"Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        served = json.loads(answer.read())["data"]
    assert [(e["event"], e["pid"]) for e in served][:1] == [("exit", gateway)]
    assert [e["event"] for e in served] == ["exit", "restart"]

    stopped = fleet.run("stop_all_services.sh")
    assert stopped.returncode == 0, stopped.stderr
    assert fleet.pid_files() == []


def test_admins_start_stop_and_restart_one_server_over_the_api_and_the_cli(fleet: Fleet) -> None:
    gateway_port, key = fleet.start_with_gateway()

    def post(path: str, with_key: str = key) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway_port}{path}", method="POST", headers={"Authorization": f"Bearer {with_key}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    status, stopped = post("/admin/models/beta/stop")
    assert status == 200 and "stop_all_models: beta stopped" in stopped["output"], stopped
    assert not (fleet.run_dir / "beta.pid").exists()
    status, again = post("/admin/models/beta/stop")
    assert (status, again["error"]["code"]) == (409, "model_not_running")

    status, started = post("/admin/models/beta/start")
    assert status == 200, started
    assert any("beta last ran simulated: started simulated again" in line for line in started["output"])
    wait_until(lambda: http_status(f"http://127.0.0.1:{fleet.ports[1]}/health") == 200, timeout=20)
    status, twice = post("/admin/models/beta/start")
    assert (status, twice["error"]["code"]) == (409, "model_running")
    assert "already running: restart it instead" in twice["error"]["message"]

    before = fleet.pid("beta")
    status, restarted = post("/admin/models/beta/restart")
    assert status == 200 and fleet.pid("beta") != before, restarted

    assert post("/admin/models/nope/start")[0] == 404
    status, unknown = post("/admin/models/beta/explode")
    assert status == 404 and "start, stop, restart" in unknown["error"]["message"]
    created = urllib.request.Request(
        f"http://127.0.0.1:{gateway_port}/admin/keys",
        data=b'{"name": "user"}',
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(created, timeout=10) as answer:
        user = json.loads(answer.read())["key"]
    assert post("/admin/models/beta/stop", with_key=user)[0] == 403

    alpha = fleet.pid("alpha")
    cli = fleet.cli("models", "restart", "alpha")
    assert cli.returncode == 0, cli.stderr
    assert "start_all_models: started alpha" in cli.stdout and fleet.pid("alpha") != alpha
    missing = fleet.cli("models", "stop", "nope")
    assert missing.returncode == 2 and "No model server with id `nope`" in missing.stderr
