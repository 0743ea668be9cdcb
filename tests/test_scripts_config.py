"""The model config: what print_model_config.sh tells the gateway, and the checks made before a start."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.fleet import FAKE_LAUNCH, Fleet
from tests.support.processes import REPO_ROOT, free_port

PREFIX = "vllm_model_configs: "


@pytest.fixture
def fleet(tmp_path: Path):
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.stop_everything()


def printed_models(fleet: Fleet, *args: str) -> list[dict[str, str]]:
    result = fleet.run("scripts/print_model_config.sh", *args)
    assert result.returncode == 0, result.stderr
    models = []
    for line in result.stdout.splitlines():
        tag, *fields = line.split("\t")
        assert tag == "model"
        models.append(dict(field.split("=", 1) for field in fields))
    return models


def config_problems(fleet: Fleet, text: str) -> list[str]:
    fleet.write_config(text)
    result = fleet.run("scripts/print_model_config.sh")
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith(PREFIX) for line in lines), lines
    return lines


def test_shipped_config_lists_the_specs_four_models_in_field_order(fleet: Fleet) -> None:
    result = fleet.run("scripts/print_model_config.sh", str(REPO_ROOT / "vllm_model_configs.sh"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    keys = [[field.split("=", 1)[0] for field in line.split("\t")] for line in lines]
    assert (
        keys
        == [
            [
                "model",
                "id",
                "name",
                "aliases",
                "path",
                "base_url",
                "api_key",
                "max_num_seqs",
                "device",
                "gpus",
                "port",
                "log",
                "max_concurrency",
                "idle",
                "cpus",
                "config",
            ]
        ]
        * 4
    )
    models = printed_models(fleet, str(REPO_ROOT / "vllm_model_configs.sh"))
    assert [(m["name"], m["port"], m["gpus"]) for m in models] == [
        ("DeepSeek-R1-0528-Qwen3-14B", "8001", "0,1,2,3"),
        ("Qwen3-14B", "8002", "0,1,2,3"),
        ("DeepSeek-R1-Distill-Qwen-7B", "8003", "0,1,2,3"),
        ("Qwen2.5-7B-Instruct", "8004", "0,1,2,3"),
    ]
    assert [Path(m["log"]).name for m in models] == [
        "deepseek_qwen3_vllm.log",
        "qwen3_14b_vllm.log",
        "deepseek_distill_vllm.log",
        "qwen_vllm.log",
    ]
    assert models[0]["base_url"] == "http://127.0.0.1:8001"


def test_print_fills_defaults_and_gives_remote_models_their_url(fleet: Fleet) -> None:
    fleet.write_config(
        "ROOT=/srv/models\n"
        "VLLM_HOST=0.0.0.0\n"
        'vllm_model name=Qwen/Qwen3-8B aliases=qwen,q8 path="$ROOT/q8" port=9001 max_num_seqs=4 api_key=k1\n'
        "vllm_model name=far id=far-1 url=https://gpu2.example:8443\n"
        "vllm_model name=cpu-one path=/srv/c port=9002 device=cpu cpus=0-3 log=/var/tmp/c.log idle=stop\n"
    )
    local, remote, cpu = printed_models(fleet)
    assert local == {
        "id": "Qwen_Qwen3-8B",
        "name": "Qwen/Qwen3-8B",
        "aliases": "qwen,q8",
        "path": "/srv/models/q8",
        # a server listening on every address is reached through the loopback one
        "base_url": "http://127.0.0.1:9001",
        "api_key": "k1",
        "max_num_seqs": "4",
        "device": "gpu",
        "gpus": "",
        "port": "9001",
        "log": str(fleet.log_dir / "Qwen_Qwen3-8B_vllm.log"),
        "max_concurrency": "",
        "idle": "none",
        "cpus": "",
        "config": "name=Qwen/Qwen3-8B id=Qwen_Qwen3-8B aliases=qwen,q8 path=/srv/models/q8 port=9001 device=gpu "
        "max_num_seqs=4 log=Qwen_Qwen3-8B_vllm.log idle=none api_key=k1",
    }
    assert (remote["id"], remote["base_url"], remote["port"], remote["log"]) == (
        "far-1",
        "https://gpu2.example:8443",
        "",
        "",
    )
    assert (cpu["device"], cpu["gpus"], cpu["log"], cpu["idle"]) == ("cpu", "", "/var/tmp/c.log", "stop")
    assert (cpu["cpus"], "cpus=0-3" in cpu["config"].split()) == ("0-3", True)


def test_config_file_is_chosen_by_argument_then_environment(fleet: Fleet, tmp_path: Path) -> None:
    fleet.write_config("vllm_model name=from-env path=/m port=9001\n")
    other = tmp_path / "other.sh"
    other.write_text("vllm_model name=from-arg path=/m port=9001\n")
    assert [m["name"] for m in printed_models(fleet)] == ["from-env"]
    assert [m["name"] for m in printed_models(fleet, str(other))] == ["from-arg"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("vllm_model name=a path=/m port=9001 gpu=0\n", "model #1 (a): unknown key 'gpu'"),
        ("vllm_model path=/m port=9001\n", "model #1: no name="),
        ("vllm_model name=a port=9001\n", "model #1 (a): needs path= (served here) or url= (served elsewhere)"),
        (
            "vllm_model name=a path=/m port=9001\nvllm_model name=b id=a path=/m port=9002\n",
            "model #2 (b): duplicate id 'a' (also model #1)",
        ),
        (
            "vllm_model name=a path=/m port=9001\nvllm_model name=b path=/m port=9001\n",
            "model #2 (b): duplicate port 9001 (also model #1)",
        ),
        (
            "vllm_model name=a path=/m port=9001 extra_args=$'--x\\t1'\n",
            "model #1 (a): extra_args= contains a tab or a newline",
        ),
        (
            "vllm_model name=a path=/m port=9001 aliases=$'x\\ny'\n",
            "model #1 (a): aliases= contains a tab or a newline",
        ),
        ("vllm_model name=a path=/m port=80000\n", "model #1 (a): port=80000 is not a port number"),
        ("vllm_model name=a path=/m port=9001 device=cpu gpus=0\n", "model #1 (a): device=cpu takes no gpus="),
        ("vllm_model name=a path=/m port=9001 gpus=0,0\n", "model #1 (a): gpus=0,0 names a GPU twice"),
        (
            "vllm_model name=a path=/m port=9001 gpu_memory_utilization=1.5\n",
            "model #1 (a): gpu_memory_utilization=1.5 is not a fraction in (0, 1]",
        ),
        ("vllm_model name=a path=/m port=9001 env=NOEQUALS\n", "model #1 (a): env= word 'NOEQUALS' is not KEY=VALUE"),
        (
            "vllm_model name=a url=http://h:1 port=9001\n",
            "model #1 (a): url= and port= exclude each other (url= is a server elsewhere)",
        ),
    ],
)
def test_each_static_problem_is_one_clear_line_and_exit_2(fleet: Fleet, config: str, expected: str) -> None:
    problems = config_problems(fleet, config)
    assert problems == [PREFIX + expected] or (len(problems) == 1 and problems[0].startswith(PREFIX + expected)), (
        problems
    )


def test_every_problem_of_a_config_is_reported_at_once(fleet: Fleet) -> None:
    problems = config_problems(
        fleet,
        (
            "vllm_model name=a path=/m port=9001 colour=red\n"
            "vllm_model name=b path=/m port=9001\n"
            "vllm_model path=/m port=9003\n"
        ),
    )
    assert len(problems) == 3
    assert "unknown key 'colour'" in problems[0]
    assert "duplicate port 9001" in problems[1]
    assert "model #3: no name=" in problems[2]


def test_missing_config_file_exits_2(fleet: Fleet, tmp_path: Path) -> None:
    result = fleet.run("scripts/print_model_config.sh", str(tmp_path / "nope.sh"))
    assert result.returncode == 2
    assert result.stderr.startswith(PREFIX) and "no such file" in result.stderr


def test_start_refuses_a_bad_config_with_the_same_lines(fleet: Fleet) -> None:
    fleet.write_config("vllm_model name=a path=/m port=9001 gpu=0\n")
    result = fleet.run("start_all_models.sh")
    assert result.returncode == 2
    assert result.stderr.startswith(PREFIX + "model #1 (a): unknown key 'gpu'")
    assert fleet.pid_files() == []


# ---- machine checks: start_all_models.sh, nothing started on any problem --------------------


def start_problems(fleet: Fleet, text: str, *args: str) -> list[str]:
    fleet.write_config(text)
    # The fixtures' CPUs are not this machine's: numactl's trial bind would fail on them.
    result = fleet.run("start_all_models.sh", *args, env={"VLLM_NUMACTL": "none"})
    assert result.returncode == 2, result
    assert fleet.pid_files() == []
    assert "nothing was started" in result.stderr.splitlines()[-1]
    return [line.removeprefix("start_all_models: ") for line in result.stderr.splitlines()[:-1]]


def test_a_port_already_in_use_stops_the_start(fleet: Fleet, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        free = free_port()
        problems = start_problems(
            fleet,
            (
                f"vllm_model name=a path={tmp_path}/m port={free} device=cpu launch_command='{FAKE_LAUNCH}'\n"
                f"vllm_model name=b path={tmp_path}/m port={busy} device=cpu launch_command='{FAKE_LAUNCH}'\n"
            ),
        )
    assert problems == [f"model b: port {busy} is already in use"]
    assert not (fleet.log_dir / "a_vllm.log").exists()  # a was fine, and still did not start


def test_a_missing_model_path_stops_the_start(fleet: Fleet, tmp_path: Path) -> None:
    problems = start_problems(fleet, (f"vllm_model name=a path={tmp_path}/absent port={free_port()} device=cpu\n"))
    assert problems == [f"model a: model path {tmp_path}/absent does not exist"]


def test_gpus_the_host_lacks_memory_over_one_and_tp_mismatch_are_each_reported(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("h200x2")
    (tmp_path / "m").mkdir()
    problems = start_problems(
        fleet,
        (
            f"vllm_model name=a path={tmp_path}/m port={free_port()} gpus=0,1,2,3 gpu_memory_utilization=0.5\n"
            f"vllm_model name=b path={tmp_path}/m port={free_port()} gpus=0,1 tensor_parallel_size=4 "
            "gpu_memory_utilization=0.6\n"
        ),
    )
    assert "model a: no GPU 2,3 on this host (GPUs here: 0 1)" in problems
    assert "model b: tensor_parallel_size=4 does not match the 2 GPUs in gpus=0,1" in problems
    assert "GPU 0: gpu_memory_utilization adds up to 1.100 > 1.0 ( a=0.5 b=0.6 )" in problems
    assert "GPU 1: gpu_memory_utilization adds up to 1.100 > 1.0 ( a=0.5 b=0.6 )" in problems
    assert len(problems) == 4


def test_unset_memory_fraction_counts_as_vllms_default_of_0_9(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("h200x2")
    (tmp_path / "m").mkdir()
    problems = start_problems(
        fleet,
        (
            f"vllm_model name=a path={tmp_path}/m port={free_port()} gpus=0\n"
            f"vllm_model name=b path={tmp_path}/m port={free_port()} gpus=0 gpu_memory_utilization=0.2\n"
        ),
    )
    assert problems == ["GPU 0: gpu_memory_utilization adds up to 1.100 > 1.0 ( a=0.9 b=0.2 )"]


def test_gpu_models_are_refused_when_nvidia_smi_cannot_list_the_gpus(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("h200x2")
    broken = fleet.bin_dir / "nvidia-smi"  # what a host with a wedged driver prints
    broken.write_text(
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn'\\''t communicate with the NVIDIA driver.'\nexit 9\n"
    )
    (tmp_path / "m").mkdir()
    problems = start_problems(fleet, f"vllm_model name=a path={tmp_path}/m port={free_port()} gpus=0\n")
    assert len(problems) == 1
    assert problems[0].startswith("model a: gpus=0 cannot be checked: nvidia-smi ")
    assert "NVIDIA-SMI has failed" in problems[0]


def test_the_shipped_config_passes_its_checks_on_a_matching_host(fleet: Fleet, tmp_path: Path) -> None:
    """The spec's four models, 0.325+0.325+0.155+0.155 of each of 4 GPUs: valid on a 4-GPU host."""
    fleet.use_gpu_fixture("synthetic-8gpu-2node")
    for name in ("DeepSeek-R1-0528-Qwen3-14B", "Qwen3-14B", "DeepSeek-R1-Distill-Qwen-7B", "Qwen2.5-7B-Instruct"):
        (tmp_path / "models" / name).mkdir(parents=True)
    result = fleet.run(
        "start_all_models.sh",
        "--dry-run",
        "--config",
        str(REPO_ROOT / "vllm_model_configs.sh"),
        env={"MODEL_ROOT": str(tmp_path / "models")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("vllm serve ") == 4
    assert fleet.pid_files() == []
