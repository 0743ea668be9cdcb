"""--simulate: the whole fleet (simulated models and the real gateway) without a GPU or weights."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from tests.support.chat import chat_body
from tests.support.fleet import Fleet, live
from tests.support.processes import free_port, http_status, process_tree

# Weights that do not exist and GPUs this machine does not have: the simulator needs neither.
CONFIG = """
vllm_model name=DeepSeek-R1-0528-Qwen3-14B path=/data/models/none-here port={p1} gpus=0,1,2,3 \\
    tensor_parallel_size=4 gpu_memory_utilization=0.325 max_num_seqs=8 log=deepseek_qwen3_vllm.log
vllm_model name=Qwen3-14B aliases=qwen path=/data/models/none-either port={p2} gpus=0,1,2,3 \\
    gpu_memory_utilization=0.325 log=qwen3_14b_vllm.log
"""


@pytest.fixture
def fleet(tmp_path: Path):
    fleet = Fleet(tmp_path)
    fleet.ports = free_port(), free_port()
    fleet.write_config(CONFIG.format(p1=fleet.ports[0], p2=fleet.ports[1]))
    gateway_env = tmp_path / "gateway.env"
    gateway_env.write_text("")
    fleet.env.update(
        {
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_KEY_FILE": str(tmp_path / "api_keys.json"),
            "GATEWAY_ENV_FILE": str(gateway_env),
            "GATEWAY_HEALTH_INTERVAL": "0.5",
        }
    )
    yield fleet
    fleet.stop_everything()


def chat(port: int, key: str, model: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        method="POST",
        data=json.dumps(chat_body(model, max_tokens=3)).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_simulated_models_start_and_stop_without_gpu_or_weights(fleet: Fleet) -> None:
    result = fleet.run("start_all_models.sh", "--simulate", "--wait")
    assert result.returncode == 0, result.stderr
    for port in fleet.ports:
        assert http_status(f"http://127.0.0.1:{port}/health") == 200
    backend_key = (fleet.run_dir / "Qwen3-14B.api_key").read_text().strip()  # the fleet made it one
    listing = urllib.request.Request(
        f"http://127.0.0.1:{fleet.ports[1]}/v1/models", headers={"Authorization": f"Bearer {backend_key}"}
    )
    models = json.loads(urllib.request.urlopen(listing).read())
    assert [m["id"] for m in models["data"]] == ["Qwen3-14B", "qwen"]
    assert "(simulated) ====" in fleet.log("qwen3_14b_vllm.log").splitlines()[0]
    trees = {pid for name in ("DeepSeek-R1-0528-Qwen3-14B", "Qwen3-14B") for pid in process_tree(fleet.pid(name))}
    status = fleet.run("status_all_services.sh")
    assert re.search(
        r"^Qwen3-14B\s+ready\(simulated\)\s+\d+\s+%d\s+ok\s+0,1,2,3" % fleet.ports[1], status.stdout, re.MULTILINE
    ), status.stdout
    result = fleet.run("stop_all_models.sh")
    assert result.returncode == 0, result.stderr
    assert live(trees) == set()
    assert all(http_status(f"http://127.0.0.1:{port}/health") is None for port in fleet.ports)


def test_vllm_simulate_variable_works_like_the_flag(fleet: Fleet) -> None:
    result = fleet.run("start_all_models.sh", "Qwen3-14B", "--wait", env={"VLLM_SIMULATE": "1"})
    assert result.returncode == 0, result.stderr
    assert "vllm_simulator" in fleet.log("qwen3_14b_vllm.log")


def test_all_services_start_serve_a_chat_through_the_gateway_and_stop(fleet: Fleet) -> None:
    result = fleet.run("start_all_services.sh", "--simulate", "--wait")
    assert result.returncode == 0, result.stderr
    # the first start's admin key is printed on the terminal, not in a log
    key = re.search(r"^\s+(sk-\S+)$", result.stdout, re.MULTILINE).group(1)
    assert key not in (fleet.log_dir / "api_server.stdout.log").read_text()
    gateway_port = int(fleet.env["GATEWAY_PORT"])
    for model in ("DeepSeek-R1-0528-Qwen3-14B", "qwen"):
        answer = chat(gateway_port, key, model)
        assert answer["choices"][0]["message"]["content"]
        assert answer["model"] == model
    status = fleet.run("status_all_services.sh")
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"^gateway\s+running\s+\d+\s+%d\s+ok" % gateway_port, status.stdout, re.MULTILINE)
    trees = set()
    for pid_file in fleet.pid_files():
        trees |= process_tree(int(pid_file.read_text().split()[0]))
    assert len(trees) >= 3

    stopped = fleet.run("stop_all_services.sh")
    assert stopped.returncode == 0, stopped.stderr
    order = [line for line in stopped.stderr.splitlines() if line.endswith(" stopped")]
    assert order[0] == "stop_api_server: gateway stopped"  # the door closes before the rooms
    assert live(trees) == set()
    assert fleet.pid_files() == []
    assert http_status(f"http://127.0.0.1:{gateway_port}/health") is None


def test_simulated_models_start_without_the_stagger_unless_asked(fleet: Fleet) -> None:
    # VLLM_START_INTERVAL empty: the config's default of 15 s applies, which --simulate skips.
    result = fleet.run("start_all_models.sh", "--simulate", env={"VLLM_START_INTERVAL": ""})
    assert result.returncode == 0, result.stderr
    assert "before the next model" not in result.stderr
    fleet.run("stop_all_models.sh")
    asked = fleet.run("start_all_models.sh", "--simulate", "--interval", "1", env={"VLLM_START_INTERVAL": ""})
    assert asked.returncode == 0, asked.stderr
    assert "waiting 1s before the next model (--interval)" in asked.stderr


def test_a_second_wait_says_the_models_were_already_running(fleet: Fleet) -> None:
    first = fleet.run("start_all_models.sh", "--simulate", "--wait")
    assert first.returncode == 0, first.stderr
    assert re.search(r"Qwen3-14B is healthy after \d+m\d+s", first.stderr), first.stderr
    second = fleet.run("start_all_models.sh", "--simulate", "--wait")
    assert second.returncode == 0, second.stderr
    assert "Qwen3-14B was already running and is healthy (up " in second.stderr
    assert "is healthy after" not in second.stderr
