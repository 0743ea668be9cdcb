"""Where each model runs: GPU -> CPU binding from nvidia-smi/lscpu outputs, the config's table, cpus=,
and the environment each server gets, as start_all_models.sh --dry-run prints them.

nvidia-smi and lscpu are fakes printing recorded outputs: h200x2 is a real 2-GPU, 1-NUMA-node host;
synthetic-8gpu-2node is made up to show the split over two nodes with hyperthreads.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.fleet import Fleet
from tests.support.processes import REPO_ROOT, free_port

PLACEMENT = REPO_ROOT / "vllm_fleet"  # python3 vllm_fleet placement


@dataclass
class Planned:
    header: str
    env: dict[str, str]
    unset: list[str]
    numactl: list[str]
    server: list[str]
    log: str


def dry_run(fleet: Fleet, config: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Planned]:
    fleet.write_config(config)
    result = fleet.run("start_all_models.sh", "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert fleet.pid_files() == []
    return parse_dry_run(result.stdout)


def parse_dry_run(text: str) -> dict[str, Planned]:
    """The printed script -> one Planned per model, read back with a shell's own word splitting."""
    lines = text.splitlines()
    assert lines[0] == f"cd {REPO_ROOT}"
    plans: dict[str, Planned] = {}
    blocks = "\n".join(lines[1:]).split("\n# ")
    for block in blocks:
        header, _, command = block.removeprefix("# ").partition("\n")
        words = shlex.split(command.replace("\\\n", " "))
        assert words[:2] == ["setsid", "env"], words
        assert command.rstrip().endswith("2>&1 < /dev/null &")
        log = words[words.index(">>") + 1]
        words = words[2 : words.index(">>")]
        unset, env = [], {}
        while words and (words[0] == "-u" or ("=" in words[0] and not words[0].startswith("-"))):
            if words[0] == "-u":
                unset.append(words[1])
                words = words[2:]
            else:
                key, value = words.pop(0).split("=", 1)
                env[key] = value
        numactl = []
        if words[0].endswith("numactl"):
            numactl = [words.pop(0)]
            while words[0].startswith("--"):
                numactl.append(words.pop(0))
        plans[header.split(":", 1)[0]] = Planned(header, env, unset, numactl, words, log)
    return plans


@pytest.fixture
def fleet(tmp_path: Path):
    fleet = Fleet(tmp_path)
    (tmp_path / "m").mkdir()
    yield fleet
    fleet.stop_everything()


def models(tmp_path: Path, *specs: str) -> str:
    return "".join(f"vllm_model path={tmp_path}/m port={free_port()} {spec}\n" for spec in specs)


def test_placement_reads_the_real_topo_output_with_its_ansi_header(fleet: Fleet) -> None:
    fleet.use_gpu_fixture("h200x2")
    result = subprocess.run(
        [sys.executable, str(PLACEMENT), "placement"], env={**fleet.env}, capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines() == [
        "online CPUs: 0-31",
        "NUMA node 0: CPUs 0-31",
        "GPU0 NVIDIA H200 00000000:00:06.0: CPUs 0-15 (node 0; nvidia-smi topo -m, split 2 ways)",
        "GPU1 NVIDIA H200 00000000:00:07.0: CPUs 16-31 (node 0; nvidia-smi topo -m, split 2 ways)",
    ]


def test_each_numa_nodes_cpus_are_split_among_its_gpus_keeping_hyperthreads_together(fleet: Fleet) -> None:
    fleet.use_gpu_fixture("synthetic-8gpu-2node")
    result = subprocess.run(
        [sys.executable, str(PLACEMENT), "placement"], env={**fleet.env}, capture_output=True, text=True, check=True
    )
    shares = [line.split(": CPUs ")[1].split(" (")[0] for line in result.stdout.splitlines() if line.startswith("GPU")]
    # node 0 = CPUs 0-47 and their second threads 96-143; node 1 = 48-95 and 144-191
    assert shares == [
        "0-11,96-107",
        "12-23,108-119",
        "24-35,120-131",
        "36-47,132-143",
        "48-59,144-155",
        "60-71,156-167",
        "72-83,168-179",
        "84-95,180-191",
    ]
    assert "(node 1; nvidia-smi topo -m, split 4 ways)" in result.stdout.splitlines()[-1]


def test_a_model_is_bound_to_the_union_of_its_gpus_cpus_and_their_memory_nodes(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("synthetic-8gpu-2node")
    plans = dry_run(
        fleet,
        models(
            tmp_path,
            "name=one gpus=0",
            "name=pair gpus=1,2",
            "name=across gpus=3,4 gpu_memory_utilization=0.5",
            "name=four gpus=4,5,6,7 gpu_memory_utilization=0.5",
        ),
    )
    assert plans["one"].numactl == ["numactl", "--physcpubind=0-11,96-107", "--membind=0"]
    assert plans["pair"].numactl == ["numactl", "--physcpubind=12-35,108-131", "--membind=0"]
    assert plans["across"].numactl == ["numactl", "--physcpubind=36-59,132-155", "--membind=0-1"]
    assert plans["four"].numactl == ["numactl", "--physcpubind=48-95,144-191", "--membind=1"]
    assert plans["pair"].env["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert plans["pair"].env["OMP_NUM_THREADS"] == "48"
    assert plans["pair"].env["VLLM_CPU_OMP_THREADS_BIND"] == "12-35,108-131"
    assert "--tensor-parallel-size" in plans["four"].server
    assert plans["four"].server[plans["four"].server.index("--tensor-parallel-size") + 1] == "4"


def test_two_gpus_of_the_real_one_node_host_share_its_32_cpus(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("h200x2")
    plans = dry_run(
        fleet,
        models(
            tmp_path,
            "name=a gpus=0 gpu_memory_utilization=0.4",
            "name=b gpus=1 gpu_memory_utilization=0.4",
            "name=both gpus=0,1 gpu_memory_utilization=0.5",
        ),
    )
    assert [plans[name].numactl[1:] for name in ("a", "b", "both")] == [
        ["--physcpubind=0-15", "--membind=0"],
        ["--physcpubind=16-31", "--membind=0"],
        ["--physcpubind=0-31", "--membind=0"],
    ]
    assert [plans[name].env["OMP_NUM_THREADS"] for name in ("a", "b", "both")] == ["16", "16", "32"]


def test_the_configs_table_overrides_the_derived_binding_like_the_spec(fleet: Fleet, tmp_path: Path) -> None:
    """The spec's GPU0->0-15, GPU1->16-31, GPU2->48-63, GPU3->64-79: 64 threads for a TP=4 model."""
    fleet.use_gpu_fixture("synthetic-8gpu-2node")
    table = 'GPU_CPU_BINDING=("0=0-15" "1=16-31" "2=48-63" "3=64-79")\n'
    plans = dry_run(
        fleet,
        table
        + models(
            tmp_path,
            "name=spec gpus=0,1,2,3 gpu_memory_utilization=0.325",
            "name=untabled gpus=5 gpu_memory_utilization=0.5",
        ),
    )
    spec = plans["spec"]
    assert spec.numactl == ["numactl", "--physcpubind=0-31,48-79", "--membind=0-1"]
    assert spec.env["OMP_NUM_THREADS"] == spec.env["TORCH_CPU_CORES"] == "64"
    assert spec.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-31,48-79"
    assert "(GPU_CPU_BINDING)" in spec.header
    # a GPU the table does not name keeps its derived share
    assert plans["untabled"].numactl == ["numactl", "--physcpubind=60-71,156-167", "--membind=1"]


def test_a_malformed_table_entry_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("h200x2")
    fleet.write_config('GPU_CPU_BINDING=("0:0-15")\n' + models(tmp_path, "name=a gpus=0 gpu_memory_utilization=0.5"))
    result = fleet.run("start_all_models.sh", "--dry-run")
    assert result.returncode == 2
    assert "GPU_CPU_BINDING entry '0:0-15' is not GPU=CPULIST (like 0=0-15)" in result.stderr


def test_cpu_models_use_their_cpus_and_get_no_gpu(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("synthetic-8gpu-2node")
    plans = dry_run(
        fleet,
        models(
            tmp_path, "name=c device=cpu cpus=100-103 launch_command='python -m vllm.entrypoints.openai.api_server'"
        ),
    )
    plan = plans["c"]
    assert plan.numactl == ["numactl", "--physcpubind=100-103", "--membind=0"]
    assert "CUDA_VISIBLE_DEVICES" not in plan.env
    assert plan.env["OMP_NUM_THREADS"] == plan.env["MKL_NUM_THREADS"] == "4"
    assert plan.env["VLLM_CPU_OMP_THREADS_BIND"] == "100-103"
    assert plan.server[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", f"{tmp_path}/m"]


def test_explicit_cpus_win_over_the_gpus_share(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("h200x2")
    plans = dry_run(fleet, models(tmp_path, "name=a gpus=0 cpus=20-23 gpu_memory_utilization=0.5"))
    assert plans["a"].numactl == ["numactl", "--physcpubind=20-23", "--membind=0"]
    assert plans["a"].env["CUDA_VISIBLE_DEVICES"] == "0"


def test_without_numactl_models_run_unbound_with_a_warning(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("h200x2")
    fleet.write_config(models(tmp_path, "name=a gpus=0 gpu_memory_utilization=0.5"))
    result = fleet.run("start_all_models.sh", "--dry-run", env={"VLLM_NUMACTL": "numactl-not-installed"})
    assert result.returncode == 0
    assert "warning: numactl not found: models run without CPU binding" in result.stderr
    plan = parse_dry_run(result.stdout)["a"]
    assert plan.numactl == []
    assert plan.server[:2] == ["vllm", "serve"]
    # unbound: the thread counts follow every online CPU of the host
    assert plan.env["OMP_NUM_THREADS"] == "32"
    assert plan.env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


def test_a_gpu_model_without_gpus_or_cpus_runs_unbound(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("h200x2")
    plans = dry_run(fleet, models(tmp_path, "name=a"))
    assert plans["a"].numactl == []
    assert "unbound (no gpus= and no cpus=)" in plans["a"].header
    assert "CUDA_VISIBLE_DEVICES" not in plans["a"].env


def test_the_specs_environment_is_applied_and_can_be_overridden(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("h200x2")
    config = models(
        tmp_path,
        "name=a gpus=0 gpu_memory_utilization=0.4",
        "name=b gpus=1 gpu_memory_utilization=0.4 env='OMP_NUM_THREADS=3 HF_HUB_OFFLINE=1'",
    )
    plans = dry_run(fleet, config, env={"MKL_NUM_THREADS": "7", "CUDA_VISIBLE_DEVICES": "5"})
    a, b = plans["a"], plans["b"]
    assert a.env == {
        "CUDA_VISIBLE_DEVICES": "0",
        "OMP_NUM_THREADS": "16",
        "MKL_NUM_THREADS": "7",
        "NUMEXPR_NUM_THREADS": "16",
        "NUMEXPR_MAX_THREADS": "16",
        "TORCH_CPU_CORES": "16",
        "TOKENIZERS_PARALLELISM": "true",
        "CUDA_DEVICE_MAX_CONNECTIONS": "16",
        "VLLM_CPU_OMP_THREADS_BIND": "0-15",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
        "KMP_AFFINITY": "granularity=fine,compact,1,0",
        "KMP_BLOCKTIME": "0",
        "OMP_SCHEDULE": "dynamic",
    }
    assert b.env["OMP_NUM_THREADS"] == "3" and b.env["HF_HUB_OFFLINE"] == "1"
    assert b.env["CUDA_VISIBLE_DEVICES"] == "1"  # the model's GPUs, whatever the caller had
    # our own settings are not handed to vLLM, which would warn about unknown VLLM_ variables
    assert {"VLLM_MODEL_CONFIG", "VLLM_RUN_DIR", "VLLM_LOG_DIR"} <= set(a.unset)


def test_dry_run_prints_the_vllm_command_line_from_every_key_but_the_api_key(fleet: Fleet, tmp_path: Path) -> None:
    fleet.use_gpu_fixture("synthetic-8gpu-2node")
    plans = dry_run(
        fleet,
        models(
            tmp_path,
            "name=Qwen3-14B aliases=qwen,q14 gpus=0,1,2,3 tensor_parallel_size=4 gpu_memory_utilization=0.325 "
            "max_model_len=32768 max_num_seqs=8 enforce_eager=true load_workers=64 api_key=sk-up "
            "log=qwen3_14b_vllm.log "
            "extra_args='--dtype bfloat16 --override-generation-config {\"temperature\":0.6}'",
        ),
        env={"VLLM_HOST": "0.0.0.0"},
    )
    plan = plans["Qwen3-14B"]
    port = plan.server[plan.server.index("--port") + 1]
    assert plan.server == [
        "vllm",
        "serve",
        f"{tmp_path}/m",
        "--served-model-name",
        "Qwen3-14B",
        "qwen",
        "q14",
        "--host",
        "0.0.0.0",
        "--port",
        port,
        "--tensor-parallel-size",
        "4",
        "--gpu-memory-utilization",
        "0.325",
        "--max-model-len",
        "32768",
        "--max-num-seqs",
        "8",
        "--enforce-eager",
        "--max-parallel-loading-workers",
        "64",
        "--dtype",
        "bfloat16",
        "--override-generation-config",
        '{"temperature":0.6}',
    ]
    assert plan.log == str(fleet.log_dir / "qwen3_14b_vllm.log")
    assert "sk-up" not in " ".join(plan.env.values())  # the key goes in by the supervisor, from run/<id>.api_key


def test_dry_run_of_the_simulator_needs_no_gpu_and_no_weights(fleet: Fleet, tmp_path: Path) -> None:
    fleet.write_config(f"vllm_model name=big path=/no/such/weights port={free_port()} gpus=0,1,2,3 aliases=b\n")
    result = fleet.run("start_all_models.sh", "--dry-run", "--simulate")
    assert result.returncode == 0, result.stderr
    plan = parse_dry_run(result.stdout)["big"]
    assert plan.numactl == []
    assert plan.server[1:] == [
        "-m",
        "vllm_simulator",
        "--model",
        "/no/such/weights",
        "--served-model-name",
        "big",
        "b",
        "--host",
        "127.0.0.1",
        "--port",
        plan.server[-1],
    ]
