"""vllm_fleet.machine: what would make a start fail on this host, found before anything starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.fleet import recorded_commands
from vllm_fleet.config import Fleet, ModelSpec
from vllm_fleet.machine import HostView, binding_notice, look_at_host, machine_problems, numactl_command
from vllm_fleet.memory import memory_fraction_problems
from vllm_fleet.placement import Place, Placement, survey


def gpu_model(model_id: str, gpus: str, **values: str) -> ModelSpec:
    spec = {
        "name": model_id,
        "id": model_id,
        "path": "hub/model",
        "port": "1",
        "device": "gpu",
        "gpus": gpus,
        "tensor_parallel_size": str(len(gpus.split(","))),
        "gpu_memory_utilization": "0.1",
        **values,
    }
    return ModelSpec(**spec)


def problems(
    *models: ModelSpec,
    view: HostView | None = None,
    simulate: bool = False,
    dry_run: bool = True,
    selected: list[int] | None = None,
) -> list[str]:
    fleet = Fleet(models=list(models))
    chosen = list(range(len(models))) if selected is None else selected
    return machine_problems(
        fleet,
        chosen,
        view or HostView(gpus=[0, 1]),
        simulate=simulate,
        dry_run=dry_run,
        port_taken=lambda host, port: port == "busy",
    )


def test_a_port_something_listens_on_is_in_use_and_stops_the_start() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = str(listener.getsockname()[1])
        fleet = Fleet(models=[ModelSpec(name="b", id="b", path="hub/m", port=busy, device="cpu")])
        # a server listening everywhere is probed on the loopback
        found = machine_problems(fleet, [0], HostView(), simulate=True, dry_run=True)
    assert found == [f"model b: port {busy} is already in use"]


def test_a_simulation_checks_only_the_ports() -> None:
    models = [
        gpu_model("a", "0,1,2,3", path="/no/such/weights", port="busy", gpu_memory_utilization="0.9"),
        gpu_model("b", "0", gpu_memory_utilization="0.9"),
    ]
    assert problems(*models, simulate=True) == ["model a: port busy is already in use"]


def test_a_local_model_path_must_exist_but_a_hub_id_is_downloaded(tmp_path: Path) -> None:
    models = [
        ModelSpec(id=name, path=path, port="1", device="cpu")
        for name, path in (
            ("abs", str(tmp_path / "none")),
            ("rel", "./none"),
            ("up", "../none"),
            ("home", "~/none"),
            ("here", str(tmp_path)),
            ("hub", "Qwen/Qwen3-8B"),
        )
    ]
    assert problems(*models) == [
        f"model abs: model path {tmp_path}/none does not exist",
        "model rel: model path ./none does not exist",
        "model up: model path ../none does not exist",
        "model home: model path ~/none does not exist",
    ]


def test_gpus_the_host_lacks_are_named_with_the_gpus_it_has() -> None:
    assert problems(gpu_model("a", "0,1,2,3", tensor_parallel_size="4")) == [
        "model a: no GPU 2,3 on this host (GPUs here: 0 1)"
    ]


def test_gpus_cannot_be_checked_when_nvidia_smi_could_not_list_them() -> None:
    view = HostView(gpu_problem="nvidia-smi not found")
    assert problems(gpu_model("a", "0"), view=view) == ["model a: gpus=0 cannot be checked: nvidia-smi not found"]


@pytest.mark.parametrize(
    ("tp", "extra_args", "expected"),
    [
        ("4", "", "tensor_parallel_size=4 does not match the 2 GPUs in gpus=0,1"),
        (
            "2",
            "--pipeline-parallel-size 2",
            "tensor_parallel_size=2 x pipeline 2 does not match the 2 GPUs in gpus=0,1",
        ),
        (
            "1",
            "-pp=3 --pipeline-parallel-size=4",
            "tensor_parallel_size=1 x pipeline 4 does not match the 2 GPUs in gpus=0,1",
        ),
        ("1", "-pp 2", None),
    ],
)
def test_tensor_parallel_times_pipeline_stages_must_be_the_number_of_gpus(
    tp: str, extra_args: str, expected: str | None
) -> None:
    found = problems(gpu_model("a", "0,1", tensor_parallel_size=tp, extra_args=extra_args))
    assert found == ([f"model a: {expected}"] if expected else [])


def test_memory_fractions_count_every_model_of_the_config_not_only_those_starting() -> None:
    models = [
        gpu_model("a", "0", gpu_memory_utilization="0.6"),
        gpu_model("running", "0", gpu_memory_utilization="0.6"),
    ]
    assert problems(*models, selected=[0]) == [
        "GPU 0: gpu_memory_utilization adds up to 1.200 > 1.0 ( a=0.6 running=0.6 )"
    ]


def test_placement_problems_come_first() -> None:
    view = HostView(gpus=[0], problems=["GPU_CPU_BINDING entry 'x' is not GPU=CPULIST (like 0=0-15)"])
    assert problems(gpu_model("a", "5"), view=view) == [
        "GPU_CPU_BINDING entry 'x' is not GPU=CPULIST (like 0=0-15)",
        "model a: no GPU 5 on this host (GPUs here: 0)",
    ]


def test_a_binding_numactl_refuses_is_a_problem_with_the_first_line_it_said(tmp_path: Path) -> None:
    numactl = tmp_path / "numactl"
    numactl.write_text('#!/bin/sh\necho "libnuma: Warning: cpu argument $1 is out of range" >&2\necho usage\nexit 1\n')
    numactl.chmod(0o755)
    view = HostView(places={0: Place("500-503", "0", 4, "cpus=")}, numactl=str(numactl))
    spec = ModelSpec(id="c", path="hub/m", port="1", device="cpu", cpus="500-503")
    assert problems(spec, view=view, dry_run=False) == [
        "model c: numactl cannot bind CPUs 500-503:"
        " libnuma: Warning: cpu argument --physcpubind=500-503 is out of range"
    ]
    assert problems(spec, view=view, dry_run=True) == []  # a dry run tries nothing


def test_numactl_is_vllm_numactl_when_installed_and_off_when_empty_or_none(tmp_path: Path) -> None:
    assert numactl_command({"VLLM_NUMACTL": "none"}) == ""
    assert numactl_command({"VLLM_NUMACTL": ""}) == ""
    assert numactl_command({"VLLM_NUMACTL": str(tmp_path / "missing")}) == ""
    assert numactl_command({"VLLM_NUMACTL": "sh"}) == "sh"


def test_running_unbound_is_said_once_as_information_when_chosen_and_as_a_warning_when_not() -> None:
    assert binding_notice({}, "numactl") is None
    assert binding_notice({"VLLM_NUMACTL": "none"}, "") == ("info", "VLLM_NUMACTL=none: models run without CPU binding")
    assert binding_notice({"VLLM_NUMACTL": ""}, "") == ("info", "VLLM_NUMACTL=: models run without CPU binding")
    assert binding_notice({}, "") == (
        "warning",
        "numactl not found: models run without CPU binding (install the numactl package)",
    )


def no_survey(table: list[str]) -> tuple[Placement, list[str]]:
    raise AssertionError("the host was surveyed")


def h200x2(table: list[str]) -> tuple[Placement, list[str]]:
    return survey(table, run=recorded_commands("h200x2"))


def test_a_simulation_places_only_models_with_cpus_and_otherwise_looks_at_no_gpu() -> None:
    fleet = Fleet(models=[gpu_model("a", "0,1"), ModelSpec(id="c", device="cpu", cpus="1")])
    view = look_at_host(fleet, [0], simulate=True, survey_host=no_survey)
    assert view.places == {} and view.online_count.isdigit()
    view = look_at_host(fleet, [0, 1], simulate=True, survey_host=h200x2)
    assert view.places == {1: Place("1", "0", 1, "cpus=")}
    assert view.online_count == "32"


def test_a_start_of_real_vllm_places_every_model_and_learns_the_gpus() -> None:
    fleet = Fleet(models=[gpu_model("a", "1"), ModelSpec(id="none")], bindings=["0=0-3"])
    view = look_at_host(fleet, [0, 1], simulate=False, survey_host=h200x2)
    assert view.gpus == [0, 1] and view.gpu_problem == ""
    assert view.places == {
        0: Place("16-31", "0", 16, "derived from nvidia-smi topo -m"),
        1: Place(note="no gpus= and no cpus="),
    }


def h200x1(table: list[str]) -> tuple[Placement, list[str]]:
    return survey(table, run=recorded_commands("h200x1"))


def test_the_specs_four_models_share_the_real_one_gpu_host_as_they_did_there() -> None:
    # What tests/gpu_host/check.sh ran on this host (docs/fleet.md): 0.325 + 0.325 + 0.155 + 0.155 of GPU 0.
    shares = ("0.325", "0.325", "0.155", "0.155")
    models = [gpu_model(f"m{n}", "0", gpu_memory_utilization=share) for n, share in enumerate(shares)]
    view = look_at_host(Fleet(models=models), [0, 1, 2, 3], simulate=False, survey_host=h200x1)
    over = Fleet(models=[*models, gpu_model("m4", "0", gpu_memory_utilization="0.2")])

    assert view.gpus == [0] and view.gpu_problem == ""
    assert set(view.places.values()) == {Place("0-15", "0", 16, "derived from nvidia-smi topo -m")}
    assert memory_fraction_problems(models) == []
    assert memory_fraction_problems(over.models) == [
        "GPU 0: gpu_memory_utilization adds up to 1.160 > 1.0 ( m0=0.325 m1=0.325 m2=0.155 m3=0.155 m4=0.2 )"
    ]
