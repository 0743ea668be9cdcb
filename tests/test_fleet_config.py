"""vllm_fleet.config: the keys of `vllm_model`, their defaults, and the static checks of a config."""

from __future__ import annotations

import shlex

import pytest

from vllm_fleet.config import (
    MODEL_KEYS,
    Fleet,
    FleetSettings,
    ModelSpec,
    duration_seconds,
    key_hint,
    load_fleet,
    parse_call,
)
from vllm_fleet.document import ConfigDocument


def load(
    *calls: str, variables: dict[str, str] | None = None, evaluated: bool = True, environ: dict[str, str] | None = None
) -> tuple[Fleet, list[str]]:
    """Each call written as its shell words, e.g. "name=a path=/m port=9001"."""
    document = ConfigDocument(
        file="/etc/models.sh",
        calls=[shlex.split(call) for call in calls],
        variables=variables or {},
        evaluated=evaluated,
    )
    return load_fleet(document, environ or {}, log_dir="/var/log/fleet")


def problems(*calls: str, variables: dict[str, str] | None = None, evaluated: bool = True) -> list[str]:
    return load(*calls, variables=variables, evaluated=evaluated)[1]


def test_the_keys_are_listed_in_the_order_the_hint_shows_them() -> None:
    assert MODEL_KEYS == (
        "name",
        "id",
        "aliases",
        "path",
        "port",
        "url",
        "gpus",
        "device",
        "cpus",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "max_model_len",
        "max_num_seqs",
        "max_concurrency",
        "enforce_eager",
        "load_workers",
        "log",
        "extra_args",
        "simulate_args",
        "idle",
        "idle_after",
        "env",
        "api_key",
        "launch_command",
    )


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("gpu", "did you mean gpus?"),  # a prefix of a key
        ("gpus_list", "did you mean gpus?"),  # a key is its prefix
        ("tensor-parallel-size", "did you mean tensor_parallel_size?"),  # dashes for underscores
        ("maxmodellen", "did you mean max_model_len?"),
    ],
)
def test_a_near_miss_of_a_key_is_answered_with_the_key_meant(key: str, hint: str) -> None:
    assert key_hint(key) == hint


def test_a_key_far_from_every_key_is_answered_with_the_list() -> None:
    assert key_hint("colour") == "keys: " + " ".join(MODEL_KEYS)


def test_each_word_problem_of_a_call_is_its_own_line_and_the_good_words_are_kept() -> None:
    values, found = parse_call(2, ["name=a", "justaword", "colour=red", "port=1", "port=2", "aliases=x\ty"])
    assert values == {"name": "a", "port": "1"}
    assert found == [
        "model #3 (a): 'justaword' is not key=value",
        "model #3 (a): unknown key 'colour' (keys: " + " ".join(MODEL_KEYS) + ")",
        "model #3 (a): key 'port' given twice",
        "model #3 (a): aliases= contains a tab or a newline",
    ]


def test_a_refused_value_does_not_count_as_given() -> None:
    values, found = parse_call(0, ["name=a", "aliases=x\ny", "aliases=z"])
    assert values["aliases"] == "z"
    assert found == ["model #1 (a): aliases= contains a tab or a newline"]


def test_a_value_keeps_every_equals_sign_after_the_first() -> None:
    values, _ = parse_call(0, ["env=A=1 B==2", "name="])
    assert values == {"env": "A=1 B==2", "name": ""}


def test_defaults_id_from_the_name_gpu_device_log_from_the_id_and_one_rank_per_gpu() -> None:
    fleet, found = load("name=Qwen/Qwen3-8B path=/m port=9001 gpus=0,1,2")
    assert found == []
    model = fleet.models[0]
    assert (model.id, model.device, model.log, model.tensor_parallel_size) == (
        "Qwen_Qwen3-8B",
        "gpu",
        "Qwen_Qwen3-8B_vllm.log",
        "3",
    )


def test_empty_values_count_as_unset_and_get_the_defaults() -> None:
    fleet, found = load("name=a id= path=/m port=9001 device= log=")
    assert found == []
    assert (fleet.models[0].id, fleet.models[0].device, fleet.models[0].log) == ("a", "gpu", "a_vllm.log")


def test_the_id_made_from_a_name_replaces_each_byte_outside_the_safe_set() -> None:
    fleet, _ = load("name=é/ü path=/m port=9001")
    assert fleet.models[0].id == "_____"  # two bytes each for é and ü, as tr has always done it


def test_given_values_win_over_the_defaults() -> None:
    fleet, found = load(
        "name=a id=a1 path=/m port=9001 gpus=0,1 tensor_parallel_size=1 device=cpu cpus=0 log=/x.log",
        "name=b path=/m port=9002 device=cpu",
    )
    model = fleet.models[0]
    assert (model.id, model.tensor_parallel_size, model.device, model.log) == ("a1", "1", "cpu", "/x.log")
    assert found == ["model #1 (a): device=cpu takes no gpus="]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        ("path=/m port=9001", "model #1: no name="),
        ("name=a port=9001", "model #1 (a): needs path= (served here) or url= (served elsewhere)"),
        ("name=a id='a b' path=/m port=9001", "model #1 (a): id=a b may only hold letters, digits, '.', '_' and '-'"),
        ("name=a url=ftp://h", "model #1 (a): url=ftp://h is not an http:// or https:// URL"),
        (
            "name=a url=http://h:1 port=9001",
            "model #1 (a): url= and port= exclude each other (url= is a server elsewhere)",
        ),
        ("name=a path=/m", "model #1 (a): no port="),
        ("name=a path=/m port=80000", "model #1 (a): port=80000 is not a port number"),
        ("name=a path=/m port=0", "model #1 (a): port=0 is not a port number"),
        ("name=a path=/m port=http", "model #1 (a): port=http is not a port number"),
        ("name=a path=/m port=9001 gpus=0,,1", "model #1 (a): gpus=0,,1 is not a comma separated list of GPU indices"),
        ("name=a path=/m port=9001 gpus=0,0", "model #1 (a): gpus=0,0 names a GPU twice"),
        ("name=a path=/m port=9001 device=cpu gpus=0", "model #1 (a): device=cpu takes no gpus="),
        ("name=a path=/m port=9001 device=tpu", "model #1 (a): device=tpu is neither gpu nor cpu"),
        ("name=a path=/m port=9001 cpus=0-3,", "model #1 (a): cpus=0-3, is not a CPU list like 0-15,32-47"),
        (
            "name=a path=/m port=9001 max_model_len=32k",
            "model #1 (a): max_model_len=32k is not a positive whole number",
        ),
        ("name=a path=/m port=9001 load_workers=0", "model #1 (a): load_workers=0 is not a positive whole number"),
        (
            "name=a path=/m port=9001 gpu_memory_utilization=1.5",
            "model #1 (a): gpu_memory_utilization=1.5 is not a fraction in (0, 1]",
        ),
        (
            "name=a path=/m port=9001 gpu_memory_utilization=0",
            "model #1 (a): gpu_memory_utilization=0 is not a fraction in (0, 1]",
        ),
        (
            "name=a path=/m port=9001 gpu_memory_utilization=1e-1",
            "model #1 (a): gpu_memory_utilization=1e-1 is not a fraction in (0, 1]",
        ),
        ("name=a path=/m port=9001 enforce_eager=yes", "model #1 (a): enforce_eager=yes is neither true nor false"),
        ("name=a path=/m port=9001 aliases=x,,y", "model #1 (a): aliases=x,,y is not a comma separated list of names"),
        ("name=a path=/m port=9001 env='A=1 NOEQUALS'", "model #1 (a): env= word 'NOEQUALS' is not KEY=VALUE"),
        ("name=a path=/m port=9001 idle=nap", "model #1 (a): idle=nap is none, sleep or stop"),
        ("name=a url=http://h:1 idle=stop", "model #1 (a): idle= is for servers this host runs, not for url="),
        (
            "name=a path=/m port=9001 device=cpu idle=sleep",
            "model #1 (a): idle=sleep needs a GPU (vLLM's sleep mode is for CUDA, ROCm and XPU): use idle=stop",
        ),
        (
            "name=a path=/m port=9001 idle=stop idle_after=soon",
            "model #1 (a): idle_after=soon is not a duration such as 900, 90s, 15m or 1h",
        ),
        (
            "name=a path=/m port=9001 idle=stop idle_after=0m",
            "model #1 (a): idle_after=0m is not a duration such as 900, 90s, 15m or 1h",
        ),
        ("name=a path=/m port=9001 idle_after=10m", "model #1 (a): idle_after= needs idle=sleep or idle=stop"),
    ],
)
def test_each_static_problem_is_one_line_naming_the_model(call: str, expected: str) -> None:
    assert problems(call) == [expected]


@pytest.mark.parametrize(
    "call",
    [
        "name=a path=/m port=9001 gpu_memory_utilization=1",
        "name=a path=/m port=9001 gpu_memory_utilization=.5",
        "name=a path=/m port=65535 enforce_eager=false",
        "name=a url=https://gpu2.example:8443",
        "name=a path=/m port=9001 device=cpu cpus=0-3,8,10-11",
        "name=a path=/m port=9001 idle=sleep idle_after=1.5h",
        "name=a path=/m port=9001 device=cpu idle=stop idle_after=90s",
        "name=a path=/m port=9001 idle=none",
    ],
)
def test_good_values_pass(call: str) -> None:
    assert problems(call) == []


def test_duplicate_ids_and_ports_name_the_model_they_repeat() -> None:
    assert problems("name=a path=/m port=9001", "name=b id=a path=/m port=9002", "name=c path=/m port=9001") == [
        "model #2 (b): duplicate id 'a' (also model #1)",
        "model #3 (c): duplicate port 9001 (also model #1)",
    ]


def test_two_models_writing_one_log_are_refused_unless_a_duplicate_id_already_says_so() -> None:
    assert problems("name=x path=/m port=9001 log=same.log", "name=y path=/m port=9002 log=same.log") == [
        "model #2 (y): log same.log is also model #1's log"
    ]
    assert problems("name=a path=/m port=9001", "name=b id=a path=/m port=9002") == [
        "model #2 (b): duplicate id 'a' (also model #1)"
    ]  # and a_vllm.log twice, not said again


def test_replicas_share_a_name_and_its_weights_but_not_their_path() -> None:
    assert problems("name=a path=/m port=9001", "name=a id=a2 path=/m port=9002") == []
    assert problems("name=a path=/m port=9001", "name=a id=a2 path=/other port=9002") == [
        "model #2 (a): same name as model #1 but another path (replicas serve the same weights)"
    ]
    assert problems("name=a path=/m port=9001", "name=a id=far url=http://h:1") == []


def test_every_problem_of_a_file_is_reported_at_once_in_file_order_word_problems_first() -> None:
    found = problems(
        "name=a path=/m port=9001 colour=red",
        "name=b path=/m port=9001",
        "path=/m port=9003",
        variables={"VLLM_START_INTERVAL": "soon"},
        evaluated=False,
    )
    assert [line.split(": ", 1)[-1] for line in found] == [
        "unknown key 'colour' (keys: " + " ".join(MODEL_KEYS) + ")",
        "/etc/models.sh could not be evaluated (bash said why above)",
        "VLLM_START_INTERVAL=soon is not a number of seconds",
        "duplicate port 9001 (also model #1)",
        "no name=",
    ]


def test_settings_come_from_the_file_over_the_environment_with_defaults_for_empty_ones() -> None:
    assert FleetSettings.from_variables({}) == FleetSettings("vllm serve", "127.0.0.1", "15")
    assert FleetSettings.from_variables({"VLLM_HOST": "", "VLLM_START_INTERVAL": ""}).host == "127.0.0.1"
    fleet, _ = load(
        "name=a path=/m port=9001",
        variables={"VLLM_HOST": "0.0.0.0"},
        environ={"VLLM_HOST": "10.0.0.1", "VLLM_START_INTERVAL": "3"},
    )
    assert (fleet.settings.host, fleet.settings.start_interval) == ("0.0.0.0", "3")


def test_a_server_listening_everywhere_is_reached_through_the_loopback() -> None:
    fleet, _ = load("name=a path=/m port=9001", "name=far url=https://gpu2:8443", variables={"VLLM_HOST": "::"})
    assert [fleet.base_url(model) for model in fleet.models] == ["http://127.0.0.1:9001", "https://gpu2:8443"]


def test_a_log_name_is_inside_the_log_directory_unless_absolute() -> None:
    fleet, _ = load("name=a path=/m port=9001", "name=b path=/m port=9002 log=/tmp/b.log")
    assert [fleet.log_path(model) for model in fleet.models] == ["/var/log/fleet/a_vllm.log", "/tmp/b.log"]


def test_a_model_with_a_url_is_remote() -> None:
    assert ModelSpec(url="http://h:1").is_remote and not ModelSpec(path="/m").is_remote


@pytest.mark.parametrize(
    ("text", "seconds"), [("900", 900.0), ("90s", 90.0), ("15m", 900.0), ("1.5h", 5400.0), ("2h", 7200.0)]
)
def test_a_duration_is_seconds_or_a_number_of_seconds_minutes_or_hours(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "15 m", "15min", "-5", "1d", "m"])
def test_anything_else_is_no_duration(text: str) -> None:
    assert duration_seconds(text) is None


def test_a_model_idles_for_fifteen_minutes_unless_told_and_never_without_idle() -> None:
    fleet, found = load("name=a path=/m port=9001 idle=stop", "name=b path=/m port=9002")
    assert found == []
    assert [(model.idle, model.idle_after) for model in fleet.models] == [("stop", "15m"), ("none", "")]
