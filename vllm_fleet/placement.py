"""Which CPUs and memory nodes each vLLM server is bound to, derived from the machine.

`python3 -m vllm_fleet placement` prints the GPU -> CPU table this host gets; `plan` (vllm_fleet.cli)
places the models of a start with `survey` and `place_models` below.

Sources: `nvidia-smi --query-gpu` (which GPUs exist), `nvidia-smi topo -m` (each GPU's CPU and NUMA
affinity), `lscpu` (online CPUs, NUMA nodes) and sysfs when topo has no answer. The CPUs near a
set of GPUs are split evenly among them; an explicit table (GPU_CPU_BINDING) wins over that.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

QUERY_FIELDS = "index,uuid,name,pci.bus_id,memory.total,memory.used,utilization.gpu"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SYSFS_PCI = Path("/sys/bus/pci/devices")


class PlacementError(Exception):
    """An input could not be read; the message says which and why."""


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]; raises ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        first, _, last = part.strip().partition("-")
        low, high = int(first), int(last or first)
        if high < low:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def format_cpulist(cpus: list[int] | set[int]) -> str:
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs(sorted(cpus)))


def runs(cpus: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive CPU numbers, as (first, last)."""
    result: list[tuple[int, int]] = []
    for cpu in cpus:
        if result and cpu == result[-1][1] + 1:
            result[-1] = (result[-1][0], cpu)
        else:
            result.append((cpu, cpu))
    return result


def split_evenly(items: list[int], parts: int) -> list[list[int]]:
    """Cut a list into `parts` consecutive pieces whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(items[start:end])
        start = end
    return pieces


def split_cpus(cpus: list[int], parts: int) -> list[list[int]]:
    """Share a NUMA node's CPUs among `parts` GPUs.

    Linux numbers hyperthread siblings N and N+cores, so a node reads like 0-47,96-143. Cutting
    every run into `parts` pieces and giving piece i of each run to GPU i keeps both threads of a
    core with the same GPU. When the runs are too short for that (odd numberings like 0,2,4,...),
    the list is cut as a whole.
    """
    if parts <= 1:
        return [list(cpus)]
    if len(cpus) < parts:
        return [list(cpus) for _ in range(parts)]
    cpu_runs = [list(range(a, b + 1)) for a, b in runs(cpus)]
    if all(len(run) >= parts for run in cpu_runs):
        shares: list[list[int]] = [[] for _ in range(parts)]
        for run in cpu_runs:
            for index, piece in enumerate(split_evenly(run, parts)):
                shares[index].extend(piece)
        return shares
    return split_evenly(list(cpus), parts)


@dataclass
class Gpu:
    index: int
    bus_id: str = ""
    name: str = ""
    memory_mib: str = ""
    affinity: list[int] = field(default_factory=list)  # CPUs near the GPU (its NUMA node's)
    nodes: list[int] = field(default_factory=list)
    cpus: list[int] = field(default_factory=list)  # this GPU's share
    source: str = ""


@dataclass
class Host:
    online: list[int]
    nodes: dict[int, list[int]]  # NUMA node -> CPUs; empty when lscpu says nothing

    def nodes_of(self, cpus: list[int]) -> list[int]:
        wanted = set(cpus)
        return sorted(node for node, node_cpus in self.nodes.items() if wanted & set(node_cpus))


def run_command(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as exc:
        raise PlacementError(f"{argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise PlacementError(f"{' '.join(argv)} did not answer in 60 s") from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise PlacementError(f"{argv[0]} failed (exit {result.returncode}){': ' + detail[0] if detail else ''}")
    return result.stdout


def parse_lscpu(text: str) -> Host:
    online: list[int] = []
    nodes: dict[int, list[int]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "On-line CPU(s) list":
            online = parse_cpulist(value)
        match = re.fullmatch(r"NUMA node(\d+) CPU\(s\)", key)
        if match and value:
            nodes[int(match.group(1))] = parse_cpulist(value)
    if not online:
        online = sorted({cpu for cpus in nodes.values() for cpu in cpus}) or list(range(os.cpu_count() or 1))
    return Host(online=online, nodes=nodes)


def parse_query(text: str) -> list[Gpu]:
    gpus = []
    for line in text.splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) >= 5 and fields[0].isdigit():
            gpus.append(Gpu(index=int(fields[0]), name=fields[2], bus_id=fields[3], memory_mib=fields[4]))
    return gpus


def parse_topo(text: str) -> dict[int, tuple[list[int] | None, list[int] | None]]:
    """GPU index -> (CPU affinity, NUMA affinity) from `nvidia-smi topo -m`; None where N/A.

    The header is underlined with ANSI codes, and rows carry one link column per device (GPUs and
    NICs) before the affinity columns, so the columns are found through the header, not counted.
    """
    lines = [ANSI_ESCAPE.sub("", line) for line in text.splitlines()]
    header = next((line for line in lines if "CPU Affinity" in line), None)
    if header is None:
        raise PlacementError("nvidia-smi topo -m printed no 'CPU Affinity' column")
    columns = [column.strip() for column in header.split("\t")]
    cpu_column = columns.index("CPU Affinity")
    numa_column = columns.index("NUMA Affinity") if "NUMA Affinity" in columns else None
    result: dict[int, tuple[list[int] | None, list[int] | None]] = {}
    for line in lines:
        match = re.match(r"GPU(\d+)\t", line)
        if not match:
            continue
        cells = [cell.strip() for cell in line.split("\t")]
        result[int(match.group(1))] = (
            cpulist_or_none(cells, cpu_column),
            cpulist_or_none(cells, numa_column),
        )
    return result


def cpulist_or_none(cells: list[str], column: int | None) -> list[int] | None:
    if column is None or column >= len(cells):
        return None
    try:
        return parse_cpulist(cells[column])
    except ValueError:  # "N/A" on hosts that do not report it
        return None


def sysfs_pci_dir(bus_id: str) -> Path:
    # nvidia-smi prints an 8-digit PCI domain (00000000:00:06.0); sysfs uses 4 (0000:00:06.0).
    domain, _, rest = bus_id.lower().partition(":")
    return SYSFS_PCI / f"{domain[-4:]}:{rest}"


def read_sysfs_affinity(gpu: Gpu) -> tuple[list[int] | None, list[int] | None]:
    device = sysfs_pci_dir(gpu.bus_id)
    cpus = nodes = None
    with contextlib.suppress(OSError, ValueError):
        cpus = parse_cpulist((device / "local_cpulist").read_text())
    try:
        node = int((device / "numa_node").read_text())
        nodes = [node] if node >= 0 else None
    except (OSError, ValueError):
        pass
    return cpus, nodes


def derive(gpus: list[Gpu], topo: dict[int, tuple[list[int] | None, list[int] | None]], host: Host) -> None:
    """Fill each GPU's affinity, nodes and share of CPUs."""
    for gpu in gpus:
        cpus, nodes = topo.get(gpu.index, (None, None))
        source = "nvidia-smi topo -m" if cpus is not None else "sysfs"
        if cpus is None or nodes is None:
            sys_cpus, sys_nodes = read_sysfs_affinity(gpu)
            cpus, nodes = cpus or sys_cpus, nodes or sys_nodes
        if cpus is None and nodes:
            cpus = sorted({cpu for node in nodes for cpu in host.nodes.get(node, [])}) or None
        if cpus is None:
            cpus, source = list(host.online), "all online CPUs (no affinity reported)"
        gpu.affinity = [cpu for cpu in cpus if cpu in set(host.online)] or cpus
        gpu.nodes = nodes if nodes is not None else host.nodes_of(gpu.affinity)
        gpu.source = source
    groups: dict[tuple[int, ...], list[Gpu]] = {}
    for gpu in sorted(gpus, key=lambda g: g.index):
        groups.setdefault(tuple(gpu.affinity), []).append(gpu)
    for affinity, members in groups.items():
        shares = split_cpus(list(affinity), len(members))  # one per member
        for position, gpu in enumerate(members):
            gpu.cpus = shares[position]
            if len(members) > 1:
                gpu.source += f", split {len(members)} ways"


def apply_table(gpus: dict[int, Gpu], table: list[str]) -> list[str]:
    """Override derived shares with GPU_CPU_BINDING entries ("0=0-15"); returns problems found."""
    problems = []
    for entry in table:
        gpu_text, _, cpu_text = entry.partition("=")
        try:
            index, cpus = int(gpu_text), parse_cpulist(cpu_text)
        except ValueError:
            problems.append(f"GPU_CPU_BINDING entry {entry!r} is not GPU=CPULIST (like 0=0-15)")
            continue
        gpu = gpus.setdefault(index, Gpu(index=index))
        gpu.cpus, gpu.source = cpus, "GPU_CPU_BINDING"
    return problems


@dataclass
class Placement:
    gpus: dict[int, Gpu]
    host: Host
    gpu_problem: str  # why no GPU could be listed; empty when nvidia-smi answered


def survey(
    table: list[str], nvidia_smi: str = "nvidia-smi", run: Callable[[list[str]], str] = run_command
) -> tuple[Placement, list[str]]:
    """The machine's GPUs and CPUs, with the table applied; also the table's malformed entries."""
    host = parse_lscpu(lscpu_text(run))
    gpus: dict[int, Gpu] = {}
    gpu_problem = ""
    try:
        listed = parse_query(run([nvidia_smi, f"--query-gpu={QUERY_FIELDS}", "--format=csv,noheader,nounits"]))
        if not listed:
            gpu_problem = "nvidia-smi lists no GPU"
        else:
            try:
                topo = parse_topo(run([nvidia_smi, "topo", "-m"]))
            except PlacementError as exc:
                print(f"placement: warning: {exc}; GPUs get CPUs from sysfs", file=sys.stderr)
                topo = {}
            derive(listed, topo, host)
            gpus = {gpu.index: gpu for gpu in listed}
    except PlacementError as exc:
        gpu_problem = str(exc)
    problems = apply_table(gpus, table)
    return Placement(gpus=gpus, host=host, gpu_problem=gpu_problem), problems


def lscpu_text(run: Callable[[list[str]], str]) -> str:
    try:
        return run(["lscpu"])
    except PlacementError as exc:
        print(f"placement: warning: {exc}; NUMA nodes unknown, memory is not bound", file=sys.stderr)
        return ""


def place_model(placement: Placement, gpus_text: str, cpus_text: str) -> tuple[list[int], str]:
    """(CPUs, note) for one model; no CPUs means: run it unbound, the note says why."""
    if cpus_text:
        return parse_cpulist(cpus_text), "cpus="
    if not gpus_text:
        return [], "no gpus= and no cpus="
    cpus: set[int] = set()
    sources = set()
    for index in (int(part) for part in gpus_text.split(",")):
        gpu = placement.gpus.get(index)
        if gpu is None or not gpu.cpus:
            reason = placement.gpu_problem or f"GPU {index} not found"
            return [], f"no CPU set for GPU {index} ({reason})"
        cpus.update(gpu.cpus)
        sources.add("GPU_CPU_BINDING" if gpu.source == "GPU_CPU_BINDING" else "derived from nvidia-smi topo -m")
    return sorted(cpus), " + ".join(sorted(sources))


@dataclass(frozen=True)
class Place:
    """Where one model runs: numactl's CPU and memory node lists; no CPUs means unbound, the note says why."""

    cpus: str = ""
    nodes: str = ""
    count: int = 0
    note: str = ""


def place_models(placement: Placement, requests: dict[int, tuple[str, str]]) -> tuple[dict[int, Place], list[str]]:
    """Place each model (index -> (gpus=, cpus=)); also the problems of values that do not parse."""
    places: dict[int, Place] = {}
    problems = []
    for index, (gpus_text, cpus_text) in requests.items():
        try:
            cpus, note = place_model(placement, gpus_text, cpus_text)
        except ValueError:
            # Named by its index, not its id, as lib.sh always printed it.
            problems.append(f"model {index}: bad gpus= or cpus= value")
            continue
        nodes = placement.host.nodes_of(cpus) if cpus else []
        places[index] = Place(format_cpulist(cpus), format_cpulist(nodes), len(cpus), note)
    return places, problems


def listed_gpus(placement: Placement) -> list[int]:
    """The GPUs nvidia-smi listed (not those only the table names), in index order."""
    return sorted(gpu.index for gpu in placement.gpus.values() if gpu.bus_id)


def table_lines(placement: Placement) -> list[str]:
    """The host's CPUs, NUMA nodes and each GPU's share, as `python3 -m vllm_fleet placement` prints them."""
    lines = [f"online CPUs: {format_cpulist(placement.host.online)}"]
    for node, cpus in sorted(placement.host.nodes.items()):
        lines.append(f"NUMA node {node}: CPUs {format_cpulist(cpus)}")
    for gpu in sorted(placement.gpus.values(), key=lambda g: g.index):
        nodes = format_cpulist(placement.host.nodes_of(gpu.cpus)) or "-"
        lines.append(
            f"GPU{gpu.index} {gpu.name or '?'} {gpu.bus_id or '?'}: CPUs {format_cpulist(gpu.cpus) or '-'}"
            f" (node {nodes}; {gpu.source})"
        )
    return lines
