"""vllm_fleet.memory: the gpu_memory_utilization of the models sharing a GPU adds up to 1.0 at most."""

from __future__ import annotations

from vllm_fleet.config import ModelSpec
from vllm_fleet.memory import memory_fraction_problems


def gpu_model(model_id: str, gpus: str, fraction: str = "", **values: str) -> ModelSpec:
    return ModelSpec(
        name=model_id, id=model_id, path="/m", gpus=gpus, device="gpu", gpu_memory_utilization=fraction, **values
    )


def test_the_specs_four_models_fill_each_of_four_gpus_to_096_and_pass() -> None:
    models = [
        gpu_model(name, "0,1,2,3", fraction)
        for name, fraction in (("a", "0.325"), ("b", "0.325"), ("c", "0.155"), ("d", "0.155"))
    ]
    assert memory_fraction_problems(models) == []


def test_exactly_one_passes_despite_binary_rounding() -> None:
    assert memory_fraction_problems([gpu_model(f"m{n}", "0", "0.1") for n in range(10)]) == []


def test_a_gpu_over_one_is_one_line_naming_each_models_share_as_written() -> None:
    models = [gpu_model("a", "0,1", "0.5"), gpu_model("b", "0,1", ".60")]
    assert memory_fraction_problems(models) == [
        "GPU 0: gpu_memory_utilization adds up to 1.100 > 1.0 ( a=0.5 b=.60 )",
        "GPU 1: gpu_memory_utilization adds up to 1.100 > 1.0 ( a=0.5 b=.60 )",
    ]


def test_an_unset_fraction_counts_as_vllms_default_of_0_9() -> None:
    assert memory_fraction_problems([gpu_model("a", "0"), gpu_model("b", "0", "0.2")]) == [
        "GPU 0: gpu_memory_utilization adds up to 1.100 > 1.0 ( a=0.9 b=0.2 )"
    ]


def test_models_served_elsewhere_or_on_cpus_take_no_gpu_memory() -> None:
    models = [
        gpu_model("a", "0", "0.9"),
        gpu_model("far", "0", "0.9", url="http://h:1"),
        ModelSpec(name="c", id="c", path="/m", device="cpu", gpu_memory_utilization="0.9"),
    ]
    assert memory_fraction_problems(models) == []


def test_gpus_are_reported_in_numeric_order() -> None:
    models = [gpu_model("a", "10,2", "0.6"), gpu_model("b", "2,10", "0.6")]
    assert [line.split(":")[0] for line in memory_fraction_problems(models)] == ["GPU 2", "GPU 10"]


def test_a_model_that_sleeps_or_stops_when_idle_still_counts_its_share() -> None:
    """It takes its share back when it wakes: the GPU must hold every model at once."""
    models = [gpu_model("a", "0", "0.6", idle="sleep", idle_after="10m"), gpu_model("b", "0", "0.6", idle="stop")]
    assert memory_fraction_problems(models) == ["GPU 0: gpu_memory_utilization adds up to 1.200 > 1.0 ( a=0.6 b=0.6 )"]
