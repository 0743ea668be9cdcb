"""End to end with real vLLM (its CPU build): start_all_services.sh starts two tiny models on two
ports, each bound to one CPU by real numactl, and the gateway; requests go through; stop_all_services.sh
leaves nothing behind; a server killed mid-stream comes back by itself.

Slow: vLLM needs 20-40 s to come up on two cores, and each server holds about 3 GB of RAM.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.browser import Browser, screenshots_dir
from tests.support.clients import client_tls, sdk
from tests.support.fleet import Fleet, cpus_allowed, live
from tests.support.processes import free_port, http_status, process_tree, wait_until
from tests.support.real_vllm import VLLM_ENV, tiny_model_dir, vllm_python

# Real vLLM answers its health checks and metrics late when another test computes beside it.
pytestmark = pytest.mark.alone

START_TIMEOUT = 600


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-fleet")
    fleet = Fleet(root)
    model = tiny_model_dir()
    fleet.ports = {"tiny-a": free_port(), "tiny-b": free_port()}
    fleet.cpus = {"tiny-a": "0", "tiny-b": "1"}
    env_words = " ".join(f"{key}={value}" for key, value in VLLM_ENV.items())
    fleet.write_config(
        f'VLLM_LAUNCH_COMMAND="{vllm_python()} -m vllm.entrypoints.openai.api_server"\n'
        + "".join(
            f"vllm_model name={name} path={model} port={port} device=cpu cpus={fleet.cpus[name]} "
            f"max_model_len=512 max_num_seqs=8 enforce_eager=true extra_args='--dtype float32' env='{env_words}' "
            # tiny-a stops when idle: an hour is never reached here, and an admin's sleep stops it at once.
            f"{'aliases=tb' if name == 'tiny-b' else 'idle=stop idle_after=1h'}\n"
            for name, port in fleet.ports.items()
        )
    )
    # A request for a model stopped as idle waits for vLLM to start again: over a minute here.
    (root / "gateway.env").write_text(f"GATEWAY_KEY_FILE={root / 'api_keys.json'}\nGATEWAY_QUEUE_TIMEOUT=600\n")
    fleet.env.update(
        {
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_ENV_FILE": str(root / "gateway.env"),
            "VLLM_PROGRESS_INTERVAL": "15",
        }
    )
    fleet.started = fleet.run(
        "start_all_services.sh",
        "--wait",
        "--interval",
        "0",
        timeout=START_TIMEOUT + 120,
        env={"VLLM_START_TIMEOUT": str(START_TIMEOUT)},
    )
    try:
        yield fleet
    finally:
        fleet.run("stop_all_services.sh", timeout=180)
        fleet.stop_everything()


@pytest.fixture(scope="module")
def admin_key(fleet: Fleet) -> str:
    assert fleet.started.returncode == 0, fleet.started.stderr
    match = re.search(r"^\s+(sk-\S+)$", fleet.started.stdout, re.MULTILINE)
    assert match, fleet.started.stdout
    return match.group(1)


def test_start_waits_for_both_models_then_the_gateway(fleet: Fleet, admin_key: str) -> None:
    lines = fleet.started.stderr.splitlines()
    healthy = [i for i, line in enumerate(lines) if " is healthy after " in line]
    gateway = [i for i, line in enumerate(lines) if "the gateway answers" in line]
    assert len(healthy) == 2 and len(gateway) == 1
    assert max(healthy) < gateway[0]
    assert any("tiny-a loading" in line for line in lines)  # progress while the engines came up


def test_a_chat_reaches_each_model_through_the_gateway(fleet: Fleet, admin_key: str) -> None:
    client = sdk(f"http://127.0.0.1:{fleet.env['GATEWAY_PORT']}/v1", admin_key)
    for requested, served in (("tiny-a", "tiny-a"), ("tb", "tiny-b")):
        answer = client.chat.completions.create(
            model=requested,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
        assert answer.usage.completion_tokens == 8
        assert answer.model in (requested, served)


def test_a_real_vllm_server_refuses_a_request_without_its_fleet_made_key(fleet: Fleet, admin_key: str) -> None:
    port = fleet.ports["tiny-a"]
    backend_key = (fleet.run_dir / "tiny-a.api_key").read_text().strip()
    direct = sdk(f"http://127.0.0.1:{port}/v1", "not-the-key")
    with pytest.raises(openai.AuthenticationError):
        direct.models.list()  # any local user who skips the gateway
    keyed = sdk(f"http://127.0.0.1:{port}/v1", backend_key)
    assert [model.id for model in keyed.models.list().data] == ["tiny-a"]


def test_every_console_page_works_in_a_browser_against_real_vllm(fleet: Fleet, admin_key: str, tmp_path: Path) -> None:
    with Browser.start(f"http://127.0.0.1:{fleet.env['GATEWAY_PORT']}", screenshots_dir(tmp_path)) as browser:
        browser.open("/console/sign-in")
        browser.sign_in(admin_key)
        browser.wait(lambda: browser.url.endswith("/console/#/overview"))
        for model in ("tiny-a", "tiny-b"):
            browser.wait_text(f'[data-model="{model}"] .card-head .badge', "ready")
        browser.go("#/models/tiny-a")
        browser.wait_text("pre.config", "device=cpu")
        for route, heading in (("#/keys", "Keys"), ("#/usage", "Usage"), ("#/requests", "Requests")):
            browser.go(route)
            browser.wait_text("main h1", heading)
            browser.wait(lambda: browser.all("main table"), message=f"{route} showed no table")  # its data came
            shown = [error.text for error in browser.all(".page-error") if error.text.strip()]
            assert shown == [], route  # the page's own error line, empty when all its calls answered
        browser.go("#/playground")
        browser.select("Model", "tiny-a (ready)")
        browser.field("Max tokens").clear()
        browser.field("Max tokens").send_keys("6")
        browser.field("Message").send_keys("hello")
        browser.button("Send").click()
        done = browser.wait_text(".turn.assistant .turn-meta", "tokens", timeout=120)
        problems = browser.problems()

    assert "6 tokens" in done
    assert problems == []


def test_numactl_binds_every_process_of_each_vllm_server_to_its_cpu(fleet: Fleet, admin_key: str) -> None:
    for name, cpu in fleet.cpus.items():
        tree = process_tree(fleet.pid(name))
        assert len(tree) >= 3, tree  # API server, engine core, worker (and helpers)
        assert {cpus_allowed(pid) for pid in tree} == {cpu}


def test_status_shows_both_models_and_the_gateway_healthy(fleet: Fleet, admin_key: str) -> None:
    result = fleet.run("status_all_services.sh")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    for name, port in fleet.ports.items():
        assert rows[name][1:5] == ["ready", str(fleet.pid(name)), str(port), "ok"]
        assert rows[name][6] == fleet.cpus[name]
        assert rows[name][8:10] == ["0", str(fleet.log_dir / f"{name}_vllm.log")]
    assert rows["supervisor"][1] == "running"
    assert rows["gateway"][1] == "running" and rows["gateway"][4] == "ok"


def test_a_killed_vllm_server_ends_its_stream_with_an_error_and_comes_back_by_itself(
    fleet: Fleet, admin_key: str
) -> None:
    gateway = f"http://127.0.0.1:{fleet.env['GATEWAY_PORT']}"
    killed = fleet.pid("tiny-b")
    old_tree = process_tree(killed)
    body = {
        "model": "tiny-b",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    events = []
    with httpx.stream(
        "POST",
        f"{gateway}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=60,
        verify=client_tls(),
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                continue
            events.append(line)
            if len(events) == 3:
                os.kill(killed, signal.SIGKILL)  # mid-stream, as a segfault or the OOM killer would
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]", events[-3:]

    # The supervisor takes the rest of the group down and starts the server again, bound as before.
    wait_until(lambda: live(old_tree) == set(), timeout=60)
    port = fleet.ports["tiny-b"]

    def restarted_and_healthy() -> bool:
        pid_file = fleet.run_dir / "tiny-b.pid"  # absent between the exit and the restart
        restarted = pid_file.exists() and int(pid_file.read_text().split()[0]) != killed
        return restarted and http_status(f"http://127.0.0.1:{port}/health") == 200

    wait_until(restarted_and_healthy, timeout=START_TIMEOUT, interval=1)
    assert {cpus_allowed(pid) for pid in process_tree(fleet.pid("tiny-b"))} == {fleet.cpus["tiny-b"]}
    client = sdk(f"{gateway}/v1", admin_key)

    def chat_answers() -> int:
        try:
            answer = client.chat.completions.create(
                model="tb",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=4,
                extra_body={"ignore_eos": True},
            )
        except openai.APIStatusError:
            return 0  # the gateway has not seen it ready yet
        return answer.usage.completion_tokens

    assert wait_until(chat_answers, timeout=60, interval=1) == 4
    lines = (fleet.log_dir / "fleet_events.jsonl").read_text().splitlines()
    exits = [line for line in lines if '"event": "exit"' in line and '"tiny-b"' in line]
    assert len(exits) == 1 and '"signal": "SIGKILL"' in exits[0]


def test_a_real_vllm_server_stopped_as_idle_is_started_again_by_the_next_request(fleet: Fleet, admin_key: str) -> None:
    gateway = f"http://127.0.0.1:{fleet.env['GATEWAY_PORT']}"
    admin = {"Authorization": f"Bearer {admin_key}"}
    first = fleet.pid("tiny-a")
    tree = process_tree(first)
    # An admin's sleep takes the path an idle_after that ran out takes: for idle=stop, a stop.
    asked = httpx.post(f"{gateway}/admin/models/tiny-a/sleep", headers=admin, timeout=120, verify=client_tls())
    assert asked.status_code == 200, asked.text
    assert asked.json()["output"] == ["tiny-a is stopped"]
    wait_until(lambda: live(tree) == set(), timeout=120)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", fleet.ports["tiny-a"])) != 0  # its port is free

    client = sdk(f"{gateway}/v1", admin_key, timeout=START_TIMEOUT)
    answer = client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "hello"}], max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert answer.usage.completion_tokens == 4
    assert fleet.pid("tiny-a") != first
    assert {cpus_allowed(pid) for pid in process_tree(fleet.pid("tiny-a"))} == {fleet.cpus["tiny-a"]}
    events = fleet.events("tiny-a")
    assert [e["event"] for e in events if e.get("detail", "").startswith("idle: ")] == ["stopped"], events
    woke = [e for e in events if e["event"] == "wake"]
    assert len(woke) == 1 and woke[0]["mode"] == "stop"
    wait_until(  # the access log is written in batches
        lambda: re.search(r" model=tiny-a .* wake_ms=[0-9.]+", (fleet.log_dir / "vllm_api_server.log").read_text()),
        timeout=10,
    )


def test_the_cpu_build_refuses_sleep_mode_so_idle_sleep_needs_a_gpu(tmp_path: Path) -> None:
    """vLLM's own error, not ours: the reason the config check refuses idle=sleep with device=cpu."""
    result = subprocess.run(
        [
            vllm_python(),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            tiny_model_dir(),
            "--port",
            str(free_port()),
            "--dtype",
            "float32",
            "--enable-sleep-mode",
        ],
        env={**os.environ, **VLLM_ENV, "VLLM_SERVER_DEV_MODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "Sleep mode is not supported on current platform." in result.stderr


def test_stop_all_services_leaves_no_process_and_free_ports(fleet: Fleet, admin_key: str) -> None:
    trees = set()
    for pid_file in fleet.pid_files():
        trees |= process_tree(int(pid_file.read_text().split()[0]))
    # Each running server's API process and engine core, the supervisor and the gateway at least
    # (tiny-a may be stopped as idle again by now: it has no PID file then, and no process).
    assert len(trees) >= 2 * len(fleet.model_pid_files()) + 2
    result = fleet.run("stop_all_services.sh", timeout=180)
    assert result.returncode == 0, result.stderr
    assert live(trees) == set()
    assert fleet.pid_files() == []
    for port in [*fleet.ports.values(), int(fleet.env["GATEWAY_PORT"])]:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert http_status(f"http://127.0.0.1:{fleet.env['GATEWAY_PORT']}/health") is None
    assert "SIGKILL" not in result.stderr  # every group left on SIGTERM
    # Each API server ran its own orderly shutdown, and nothing crashed before it. (vLLM's default
    # --shutdown-timeout 0 aborts the engine at once, and its output task sometimes logs that as
    # an EngineDeadError traceback during the shutdown itself; that one is vLLM's, not a crash.)
    for name in fleet.ports:
        # the run since the last restart (tiny-b's killed run may have logged its engine's death)
        log = Path(fleet.log_dir / f"{name}_vllm.log").read_text().rpartition("supervisor restarts")[2]
        before, triggered, after = log.partition("[shutdown] API server: shutdown triggered")
        assert triggered, log[-2000:]
        assert "Traceback" not in before
        assert "Application shutdown complete." in after
