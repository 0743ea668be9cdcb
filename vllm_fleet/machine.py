"""What would make a start fail on this host, found before anything starts: a port in use, a model
path that does not exist, GPUs nvidia-smi does not list, parallel sizes that do not match the GPUs,
memory fractions over 1.0 and CPU bindings numactl refuses.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .config import Fleet, probe_host
from .memory import memory_fraction_problems
from .placement import Place, Placement, listed_gpus, place_models, survey

PIPELINE = re.compile(r".*(--pipeline-parallel-size|-pp)[ =]([0-9]+)")  # the last one given wins
LOCAL_PATH = ("/", "./", "../", "~")  # other paths are hub ids, which vLLM downloads
PORT_TIMEOUT = 3.0  # seconds; a port that accepts nothing in that time counts as free


@dataclass
class HostView:
    """What a start learnt of the host: each model's place, the GPUs, the CPUs, numactl."""

    places: dict[int, Place] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # table entries and values that do not parse
    gpus: list[int] = field(default_factory=list)  # as nvidia-smi listed them
    gpu_problem: str = ""  # why nvidia-smi could not list them
    online_count: str = "1"
    numactl: str = ""  # the numactl to bind with; empty: binding is off


def numactl_command(variables: Mapping[str, str]) -> str:
    """VLLM_NUMACTL (default numactl) when installed; empty when missing, or set empty or to none."""
    wanted = variables.get("VLLM_NUMACTL", "numactl")
    if wanted in ("", "none"):
        return ""
    return wanted if shutil.which(wanted) else ""


def binding_notice(variables: Mapping[str, str], numactl: str) -> tuple[str, str] | None:
    """(level, message) when models will run without CPU binding, for a start of real vLLM servers."""
    if numactl:
        return None
    if variables.get("VLLM_NUMACTL", "numactl") == "" or variables.get("VLLM_NUMACTL") == "none":
        return "info", f"VLLM_NUMACTL={variables.get('VLLM_NUMACTL', '')}: models run without CPU binding"
    return "warning", "numactl not found: models run without CPU binding (install the numactl package)"


def look_at_host(
    fleet: Fleet,
    selected: list[int],
    *,
    simulate: bool,
    survey_host: Callable[[list[str]], tuple[Placement, list[str]]] = survey,
) -> HostView:
    """Place the selected models; a simulation places only those with cpus= and lists no GPU."""
    requests = {
        index: ("" if simulate else fleet.models[index].gpus, fleet.models[index].cpus)
        for index in selected
        if not simulate or fleet.models[index].cpus
    }
    view = HostView(numactl=numactl_command(fleet.variables))
    if not requests:
        view.online_count = nproc()
        return view
    placement, table_problems = survey_host(fleet.bindings)
    view.places, place_problems = place_models(placement, requests)
    view.problems = table_problems + place_problems
    view.gpus = listed_gpus(placement)
    view.gpu_problem = placement.gpu_problem
    view.online_count = str(len(placement.host.online))
    return view


def nproc() -> str:
    """coreutils' nproc (the CPUs we may use; it also honours OMP_NUM_THREADS), 1 if it has no answer."""
    try:
        result = subprocess.run(["nproc"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "1"
    return result.stdout.strip() or "1"


def machine_problems(
    fleet: Fleet,
    selected: list[int],
    view: HostView,
    *,
    simulate: bool,
    dry_run: bool,
    port_taken: Callable[[str, str], bool] | None = None,
) -> list[str]:
    """Everything that would make the start of the selected models fail, one line each."""
    port_taken = port_taken or port_in_use
    problems = list(view.problems)
    for index in selected:
        model = fleet.models[index]
        label = f"model {model.id}"
        if port_taken(fleet.settings.host, model.port):
            problems.append(f"{label}: port {model.port} is already in use")
        if simulate:
            continue
        if model.path.startswith(LOCAL_PATH) and not os.path.exists(model.path):
            problems.append(f"{label}: model path {model.path} does not exist")
        if model.device != "gpu" or not model.gpus:
            continue
        gpus = model.gpus.split(",")
        if view.gpu_problem:
            problems.append(f"{label}: gpus={model.gpus} cannot be checked: {view.gpu_problem}")
        else:
            listed = [str(gpu) for gpu in view.gpus]
            missing = [gpu for gpu in gpus if gpu not in listed]
            if missing:
                here = "".join(f" {gpu}" for gpu in view.gpus)
                problems.append(f"{label}: no GPU {','.join(missing)} on this host (GPUs here:{here})")
        pipeline = PIPELINE.match(model.extra_args)
        stages = pipeline.group(2) if pipeline else ""
        if int(model.tensor_parallel_size) * int(stages or "1") != len(gpus):
            shown = f"{model.tensor_parallel_size} x pipeline {stages}" if stages else model.tensor_parallel_size
            problems.append(
                f"{label}: tensor_parallel_size={shown} does not match the {len(gpus)} GPUs in gpus={model.gpus}"
            )
    if not simulate:
        problems += memory_fraction_problems(fleet.models)
    if view.numactl and not dry_run:
        for index in selected:
            place = view.places.get(index)
            if place and place.cpus:
                refusal = numactl_refusal(view.numactl, place)
                if refusal is not None:
                    problems.append(f"model {fleet.models[index].id}: numactl cannot bind CPUs {place.cpus}: {refusal}")
    return problems


def port_in_use(host: str, port: str) -> bool:
    """Something accepts connections on the port, reached as a client of a server on `host` would."""
    try:
        with socket.create_connection((probe_host(host), int(port)), timeout=PORT_TIMEOUT):
            return True
    except (OSError, ValueError):
        return False


def numactl_refusal(numactl: str, place: Place) -> str | None:
    """None when numactl can apply the binding (tried on `true`), else the first line it said."""
    argv = [numactl, f"--physcpubind={place.cpus}", *([f"--membind={place.nodes}"] if place.nodes else []), "true"]
    try:
        result = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", check=False
        )
    except OSError as exc:
        return str(exc)
    if result.returncode == 0:
        return None
    return result.stdout.rstrip("\n").partition("\n")[0]
