"""vllm_fleet.commands: each server's environment and command line, and the shell text printed for it."""

from __future__ import annotations

import shlex

import pytest

from vllm_fleet.commands import command_text, model_argv, model_env, server_command, shell_word, without_api_keys
from vllm_fleet.config import Fleet, FleetSettings, ModelSpec
from vllm_fleet.placement import Place

TUNING = ["TOKENIZERS_PARALLELISM=true", "CUDA_DEVICE_MAX_CONNECTIONS=16"]
AFTER_BIND = [
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1",
    "KMP_AFFINITY=granularity=fine,compact,1,0",
    "KMP_BLOCKTIME=0",
    "OMP_SCHEDULE=dynamic",
]


def model(**values: str) -> ModelSpec:
    return ModelSpec(**{"name": "m", "id": "m", "path": "/w/m", "port": "8001", "device": "gpu", **values})


def fleet_of(*models: ModelSpec, variables: dict[str, str] | None = None, host: str = "127.0.0.1") -> Fleet:
    return Fleet(models=list(models), settings=FleetSettings(host=host), log_dir="/logs", variables=variables or {})


@pytest.mark.parametrize("word", ["plain", "a b", "it's", "", "$HOME", "*", "x\ty", "naïve", "'", "a=b c"])
def test_a_quoted_word_reads_back_as_itself_in_a_shell(word: str) -> None:
    assert shlex.split(shell_word(word)) == [word]


def test_only_words_that_need_it_are_quoted() -> None:
    assert [shell_word(word) for word in ("0-15,32-47", "a=b:c@d%e^f+g", "it's")] == [
        "0-15,32-47",
        "a=b:c@d%e^f+g",
        "'it'\\''s'",
    ]


def test_the_printed_command_lists_its_environment_one_word_a_line_and_goes_to_the_log() -> None:
    argv = ["setsid", "env", "-u", "VLLM_HOST", "A=1", "B=x y", "numactl", "--physcpubind=0-3", "vllm", "serve", "/m"]
    assert command_text("/logs/my log", argv) == (
        "setsid env \\\n"
        "    -u VLLM_HOST \\\n"
        "    A=1 \\\n"
        "    'B=x y' \\\n"
        "  numactl --physcpubind=0-3 vllm serve /m \\\n"
        "  >> '/logs/my log' 2>&1 < /dev/null &\n"
    )


def test_the_printed_command_reads_back_as_the_same_words() -> None:
    argv = ["setsid", "env", "A=it's", "vllm", "serve", "/m", "--override-generation-config", '{"t":0.6}']
    words = shlex.split(command_text("/l", argv).replace("\\\n", " "))
    assert words[: words.index(">>")] == argv


def test_logs_get_the_command_without_its_api_keys() -> None:
    text = command_text("/l", ["vllm", "serve", "/m", "--api-key", "sk-up", "--port", "1"])
    assert without_api_keys(text) == "vllm serve /m --api-key *** --port 1 \\\n  >> /l 2>&1 < /dev/null &\n"


def test_thread_counts_follow_the_cpu_set_and_the_rest_is_the_specs_tuning() -> None:
    env = model_env(model(gpus="0,1"), "16", "0-15", {})
    assert env == [
        "CUDA_VISIBLE_DEVICES=0,1",
        "OMP_NUM_THREADS=16",
        "MKL_NUM_THREADS=16",
        "NUMEXPR_NUM_THREADS=16",
        "NUMEXPR_MAX_THREADS=16",
        "TORCH_CPU_CORES=16",
        *TUNING,
        "VLLM_CPU_OMP_THREADS_BIND=0-15",
        *AFTER_BIND,
    ]


def test_an_unbound_model_lets_vllm_choose_where_its_threads_run() -> None:
    assert "VLLM_CPU_OMP_THREADS_BIND=auto" in model_env(model(), "32", "", {})


def test_only_gpu_models_with_gpus_get_cuda_visible_devices() -> None:
    for spec in (model(device="cpu"), model(gpus="")):
        assert not any(word.startswith("CUDA_VISIBLE_DEVICES=") for word in model_env(spec, "4", "0-3", {}))


def test_a_variable_of_the_same_name_replaces_a_default_and_the_models_env_words_win() -> None:
    env = model_env(
        model(gpus="1", env="OMP_NUM_THREADS=3 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4"),
        "16",
        "16-31",
        {"MKL_NUM_THREADS": "7", "KMP_BLOCKTIME": "", "CUDA_VISIBLE_DEVICES": "5"},
    )
    assert "MKL_NUM_THREADS=7" in env and "KMP_BLOCKTIME=" in env
    assert "CUDA_VISIBLE_DEVICES=1" in env  # the model's GPUs, whatever the caller had
    assert env[1] == "OMP_NUM_THREADS=4"  # replaced in place, the later word last
    assert env[-1] == "HF_HUB_OFFLINE=1"  # a new name goes at the end


def test_every_key_becomes_its_vllm_option_in_a_fixed_order_but_the_api_key_which_goes_in_the_environment() -> None:
    spec = model(
        name="Qwen3-14B",
        aliases="qwen,q14",
        gpus="0,1,2,3",
        tensor_parallel_size="4",
        gpu_memory_utilization="0.325",
        max_model_len="32768",
        max_num_seqs="8",
        enforce_eager="true",
        load_workers="64",
        api_key="sk-up",
        extra_args='--dtype bfloat16  --x {"t":0.6}',
    )
    assert model_argv(spec, fleet_of(spec, host="0.0.0.0"), False, "python3") == [
        "vllm",
        "serve",
        "/w/m",
        "--served-model-name",
        "Qwen3-14B",
        "qwen",
        "q14",
        "--host",
        "0.0.0.0",
        "--port",
        "8001",
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
        "--x",
        '{"t":0.6}',
    ]


def test_enforce_eager_false_adds_nothing() -> None:
    assert "--enforce-eager" not in model_argv(model(enforce_eager="false"), fleet_of(), False, "python3")


@pytest.mark.parametrize(
    ("launch", "start"),
    [
        ("vllm serve", ["vllm", "serve", "/w/m"]),
        ("/opt/venv/bin/vllm  serve", ["/opt/venv/bin/vllm", "serve", "/w/m"]),
        (
            "python -m vllm.entrypoints.openai.api_server",
            ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/w/m"],
        ),
    ],
)
def test_vllm_serve_takes_the_weights_as_its_argument_other_launchers_as_model(launch: str, start: list[str]) -> None:
    spec = model(launch_command=launch)
    assert model_argv(spec, fleet_of(spec), False, "python3")[: len(start)] == start


def test_the_fleets_launch_command_is_used_when_the_model_names_none() -> None:
    fleet = Fleet(models=[], settings=FleetSettings(launch_command="python -m x"))
    assert model_argv(model(), fleet, False, "python3")[:4] == ["python", "-m", "x", "--model"]


def test_the_simulator_gets_only_the_options_it_knows() -> None:
    spec = model(
        aliases="b",
        gpus="0,1",
        tensor_parallel_size="2",
        max_num_seqs="3",
        max_model_len="100",
        api_key="k",
        enforce_eager="true",
        extra_args="--dtype half",
    )
    assert model_argv(spec, fleet_of(spec), True, "/venv/bin/python") == [
        "/venv/bin/python",
        "-m",
        "vllm_simulator",
        "--model",
        "/w/m",
        "--served-model-name",
        "m",
        "b",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "--max-num-seqs",
        "3",
        "--max-model-len",
        "100",
    ]


def test_simulate_args_reach_the_simulator_and_never_vllm() -> None:
    spec = model(extra_args="--dtype half", simulate_args="--exit-after 5 --exit-code 3")
    simulated = model_argv(spec, fleet_of(spec), True, "python3")
    assert simulated[-4:] == ["--exit-after", "5", "--exit-code", "3"] and "--dtype" not in simulated
    real = model_argv(spec, fleet_of(spec), False, "python3")
    assert real[-2:] == ["--dtype", "half"] and "--exit-after" not in real


def test_a_model_that_sleeps_when_idle_runs_with_vllms_sleep_mode_and_its_endpoints() -> None:
    spec = model(idle="sleep", idle_after="10m")
    for simulate in (False, True):
        assert "--enable-sleep-mode" in model_argv(spec, fleet_of(spec), simulate, "python3")
    assert "VLLM_SERVER_DEV_MODE=1" in model_env(spec, "8", "", {})
    for other in (model(idle="stop", idle_after="10m"), model()):
        assert "--enable-sleep-mode" not in model_argv(other, fleet_of(other), False, "python3")
        assert not [word for word in model_env(other, "8", "", {}) if word.startswith("VLLM_SERVER_DEV_MODE")]


def command(
    spec: ModelSpec,
    place: Place,
    *,
    numactl: str = "numactl",
    simulate: bool = False,
    environ: dict[str, str] | None = None,
) -> tuple[list[str], str, str]:
    result = server_command(
        spec,
        fleet_of(spec),
        place,
        simulate=simulate,
        numactl=numactl,
        online_count="32",
        python="python3",
        environ=environ or {},
    )
    return result.argv, result.place_text, result.warning


def test_a_placed_model_runs_under_numactl_on_its_cpus_and_their_memory_nodes() -> None:
    argv, text, warning = command(model(gpus="0"), Place("0-15", "0", 16, "derived from nvidia-smi topo -m"))
    assert argv[argv.index("numactl") :][:4] == ["numactl", "--physcpubind=0-15", "--membind=0", "vllm"]
    assert "OMP_NUM_THREADS=16" in argv
    assert (text, warning) == ("CPUs 0-15, memory node 0 (derived from nvidia-smi topo -m)", "")


def test_without_memory_nodes_only_the_cpus_are_bound() -> None:
    argv, text, _ = command(model(device="cpu", cpus="0-3"), Place("0-3", "", 4, "cpus="))
    assert argv[argv.index("numactl") + 1 :][:2] == ["--physcpubind=0-3", "vllm"]
    assert text == "CPUs 0-3 (cpus=)"


def test_without_numactl_a_placed_model_runs_unbound_on_every_online_cpu() -> None:
    argv, text, warning = command(model(gpus="0"), Place("0-15", "0", 16, "derived"), numactl="")
    assert "OMP_NUM_THREADS=32" in argv and "VLLM_CPU_OMP_THREADS_BIND=auto" in argv
    assert not any("numactl" in word for word in argv)
    assert (text, warning) == ("unbound (no numactl)", "")


def test_a_model_left_unplaced_is_unbound_and_warned_about_only_when_real_vllm_could_be_bound() -> None:
    place = Place(note="no gpus= and no cpus=")
    assert command(model(), place)[1:] == (
        "unbound (no gpus= and no cpus=)",
        "m runs without CPU binding: no gpus= and no cpus=",
    )
    assert command(model(), place, simulate=True)[2] == ""
    assert command(model(), place, numactl="")[2] == ""
    assert command(model(), Place())[1:] == ("unbound", "m runs without CPU binding: no CPU set")


def test_the_scripts_own_settings_exported_to_us_are_unset_for_the_server() -> None:
    argv, _, _ = command(model(), Place(), environ={"VLLM_RUN_DIR": "/r", "VLLM_HOST": "h", "VLLM_OTHER": "x"})
    assert argv[:6] == ["setsid", "env", "-u", "VLLM_RUN_DIR", "-u", "VLLM_HOST"]
    assert "VLLM_OTHER" not in argv
