"""vllm_fleet.placement: GPU -> CPU shares from the recorded nvidia-smi and lscpu outputs in
tests/fixtures/nvidia-smi (h200x2 is a real 2-GPU, 1-NUMA-node host; synthetic-8gpu-2node is made up
to show the split over two nodes with hyperthreads), the config's table, and each model's place.
"""

from __future__ import annotations

import pytest

from tests.support.fleet import FIXTURES, recorded_commands
from vllm_fleet.placement import (
    Place,
    Placement,
    format_cpulist,
    listed_gpus,
    parse_cpulist,
    parse_topo,
    place_models,
    split_cpus,
    survey,
    table_lines,
)


def surveyed(name: str, table: list[str] | None = None, **kwargs: bool) -> tuple[Placement, list[str]]:
    return survey(table or [], run=recorded_commands(name, **kwargs))


def shares(placement: Placement) -> list[str]:
    return [format_cpulist(gpu.cpus) for _, gpu in sorted(placement.gpus.items())]


def test_cpu_lists_are_read_and_written_as_ranges() -> None:
    assert parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    with pytest.raises(ValueError):
        parse_cpulist("5-3")


def test_the_real_topo_output_is_read_through_its_ansi_underlined_header() -> None:
    topo = parse_topo((FIXTURES / "h200x2" / "topo_m.txt").read_text())
    assert topo == {0: (list(range(32)), [0]), 1: (list(range(32)), [0])}


def test_two_gpus_of_the_real_one_node_host_share_its_32_cpus() -> None:
    placement, problems = surveyed("h200x2")
    assert problems == [] and placement.gpu_problem == ""
    assert shares(placement) == ["0-15", "16-31"]
    assert listed_gpus(placement) == [0, 1]


def test_each_numa_nodes_cpus_are_split_among_its_gpus_keeping_hyperthreads_together() -> None:
    placement, _ = surveyed("synthetic-8gpu-2node")
    # node 0 = CPUs 0-47 and their second threads 96-143; node 1 = 48-95 and 144-191
    assert shares(placement) == [
        "0-11,96-107",
        "12-23,108-119",
        "24-35,120-131",
        "36-47,132-143",
        "48-59,144-155",
        "60-71,156-167",
        "72-83,168-179",
        "84-95,180-191",
    ]
    assert placement.gpus[7].source == "nvidia-smi topo -m, split 4 ways"


def test_cpus_numbered_too_sparsely_for_runs_are_cut_as_one_list() -> None:
    assert split_cpus([0, 2, 4, 6], 2) == [[0, 2], [4, 6]]
    assert split_cpus([0, 1], 4) == [[0, 1]] * 4  # fewer CPUs than GPUs: they share them all


def test_the_configs_table_overrides_the_derived_share_of_the_gpus_it_names() -> None:
    placement, problems = surveyed("synthetic-8gpu-2node", ["0=0-15", "1=16-31", "2=48-63", "3=64-79"])
    assert problems == []
    assert shares(placement)[:5] == ["0-15", "16-31", "48-63", "64-79", "48-59,144-155"]
    assert placement.gpus[0].source == "GPU_CPU_BINDING"


def test_a_malformed_table_entry_is_a_problem_and_a_gpu_only_the_table_names_is_not_listed() -> None:
    placement, problems = surveyed("h200x2", ["0:0-15", "9=0-3"])
    assert problems == ["GPU_CPU_BINDING entry '0:0-15' is not GPU=CPULIST (like 0=0-15)"]
    assert listed_gpus(placement) == [0, 1]


def test_a_model_gets_the_union_of_its_gpus_cpus_and_their_memory_nodes() -> None:
    placement, _ = surveyed("synthetic-8gpu-2node")
    places, problems = place_models(placement, {0: ("0", ""), 1: ("1,2", ""), 2: ("3,4", ""), 3: ("4,5,6,7", "")})
    assert problems == []
    assert places == {
        0: Place("0-11,96-107", "0", 24, "derived from nvidia-smi topo -m"),
        1: Place("12-35,108-131", "0", 48, "derived from nvidia-smi topo -m"),
        2: Place("36-59,132-155", "0-1", 48, "derived from nvidia-smi topo -m"),
        3: Place("48-95,144-191", "1", 96, "derived from nvidia-smi topo -m"),
    }


def test_gpus_from_the_table_and_derived_ones_say_both_sources() -> None:
    placement, _ = surveyed("synthetic-8gpu-2node", ["0=0-15"])
    places, _ = place_models(placement, {0: ("0,5", "")})
    assert places[0].note == "GPU_CPU_BINDING + derived from nvidia-smi topo -m"


def test_explicit_cpus_win_over_the_gpus_share() -> None:
    placement, _ = surveyed("h200x2")
    places, _ = place_models(placement, {0: ("0", "20-23")})
    assert places[0] == Place("20-23", "0", 4, "cpus=")


def test_a_model_without_a_cpu_set_is_unbound_and_the_note_says_why() -> None:
    placement, _ = surveyed("h200x2")
    places, _ = place_models(placement, {0: ("", ""), 1: ("5", "")})
    assert places[0] == Place(note="no gpus= and no cpus=")
    assert places[1] == Place(note="no CPU set for GPU 5 (GPU 5 not found)")


def test_when_nvidia_smi_fails_gpu_models_are_unbound_with_its_reason_and_cpus_still_bind() -> None:
    placement, _ = surveyed("h200x2", nvidia_smi_fails=True)
    assert placement.gpu_problem == "nvidia-smi failed (exit 9): NVIDIA-SMI has failed"
    places, _ = place_models(placement, {0: ("0", ""), 1: ("", "1")})
    assert places[0].note == "no CPU set for GPU 0 (nvidia-smi failed (exit 9): NVIDIA-SMI has failed)"
    assert places[1] == Place("1", "0", 1, "cpus=")


def test_a_cpu_range_that_runs_backwards_is_a_problem_of_that_model_only() -> None:
    placement, _ = surveyed("h200x2")
    places, problems = place_models(placement, {0: ("", "5-3"), 1: ("", "1")})
    assert problems == ["model 0: bad gpus= or cpus= value"]  # lib.sh's words: the index, not the id
    assert list(places) == [1]


def test_the_table_printed_for_the_real_host() -> None:
    placement, _ = surveyed("h200x2")
    assert table_lines(placement) == [
        "online CPUs: 0-31",
        "NUMA node 0: CPUs 0-31",
        "GPU0 NVIDIA H200 00000000:00:06.0: CPUs 0-15 (node 0; nvidia-smi topo -m, split 2 ways)",
        "GPU1 NVIDIA H200 00000000:00:07.0: CPUs 16-31 (node 0; nvidia-smi topo -m, split 2 ways)",
    ]


def test_the_real_one_gpu_hosts_gpu_gets_every_cpu_of_its_node() -> None:
    placement, problems = surveyed("h200x1")
    assert problems == [] and placement.gpu_problem == ""
    assert shares(placement) == ["0-15"]
    assert listed_gpus(placement) == [0]
    assert placement.gpus[0].source == "nvidia-smi topo -m"
