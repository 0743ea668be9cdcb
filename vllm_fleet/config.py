"""The model config's static rules: the keys of `vllm_model`, their defaults, and every check made
before anything runs (by the scripts, and by the gateway through scripts/print_model_config.sh).

Values are strings as bash has them; an empty value counts as unset, like `${VAR:-default}`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from .document import ConfigDocument

# POSIX classes spelled out: Python's \s and \d would also take Unicode spaces and digits, bash's
# [[:space:]] and [0-9] do not.
SPACE = " \t\n\r\f\v"
NUMBER = re.compile(r"[0-9]+")
POSITIVE = re.compile(r"[1-9][0-9]*")
PORT = NUMBER
MODEL_ID = re.compile(r"[A-Za-z0-9._-]+")
ID_BYTE_OUTSIDE = re.compile(rb"[^A-Za-z0-9._\n-]")  # what `tr -c 'A-Za-z0-9._\n-' '_'` replaces
URL = re.compile(rf"https?://[^{SPACE}]+")
GPU_LIST = re.compile(r"[0-9]+(,[0-9]+)*")
CPU_LIST = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")
FRACTION = re.compile(r"[0-9]*\.?[0-9]+")
NAME_LIST = re.compile(rf"[^,{SPACE}]+(,[^,{SPACE}]+)*")
ENV_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
WORD_SEPARATOR = re.compile(r"[ \t\n]+")  # bash's default IFS
DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smh]?)")
IDLE_ACTIONS = ("none", "sleep", "stop")
DEFAULT_IDLE_AFTER = "15m"
WHOLE_NUMBER_KEYS = ("tensor_parallel_size", "max_model_len", "max_num_seqs", "max_concurrency", "load_workers")

DEFAULT_LAUNCH_COMMAND = "vllm serve"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_START_INTERVAL = "15"


@dataclass
class ModelSpec:
    """One `vllm_model` call: every key of it, in the order `key_hint` lists them."""

    name: str = ""
    id: str = ""
    aliases: str = ""
    path: str = ""
    port: str = ""
    url: str = ""
    gpus: str = ""
    device: str = ""
    cpus: str = ""
    tensor_parallel_size: str = ""
    gpu_memory_utilization: str = ""
    max_model_len: str = ""
    max_num_seqs: str = ""
    # The gateway's limit of requests in flight to this server (default: max_num_seqs); not for vLLM.
    max_concurrency: str = ""
    enforce_eager: str = ""
    load_workers: str = ""
    log: str = ""
    extra_args: str = ""
    simulate_args: str = ""  # the simulator's own flags (--exit-after ...), for --simulate only
    # What the server does once no request came for idle_after: nothing, sleep (vLLM's sleep mode)
    # or stop; either way the next request wakes it (the supervisor's idle handling).
    idle: str = ""
    idle_after: str = ""  # a duration: 900, 90s, 15m, 1h
    env: str = ""
    api_key: str = ""
    launch_command: str = ""

    def value(self, key: str) -> str:
        value: str = getattr(self, key)
        return value

    @property
    def is_remote(self) -> bool:
        """url= names a server on another host: the scripts leave it alone, the gateway uses it."""
        return bool(self.url)


MODEL_KEYS = tuple(spec_field.name for spec_field in fields(ModelSpec))


@dataclass(frozen=True)
class FleetSettings:
    """The config file's fleet-wide variables (or the environment's), with the scripts' defaults."""

    launch_command: str = DEFAULT_LAUNCH_COMMAND
    host: str = DEFAULT_HOST
    start_interval: str = DEFAULT_START_INTERVAL  # as written: check_config says if it is a number

    @classmethod
    def from_variables(cls, variables: Mapping[str, str]) -> FleetSettings:
        return cls(
            launch_command=variables.get("VLLM_LAUNCH_COMMAND") or DEFAULT_LAUNCH_COMMAND,
            host=variables.get("VLLM_HOST") or DEFAULT_HOST,
            start_interval=variables.get("VLLM_START_INTERVAL") or DEFAULT_START_INTERVAL,
        )


@dataclass
class Fleet:
    """The models of one config file and what their rules need from around them."""

    models: list[ModelSpec]
    settings: FleetSettings = field(default_factory=FleetSettings)
    bindings: list[str] = field(default_factory=list)  # GPU_CPU_BINDING
    log_dir: str = "logs"
    # The variables bash sees once the file is evaluated: the environment and the file's own.
    variables: Mapping[str, str] = field(default_factory=dict)

    def log_path(self, model: ModelSpec) -> str:
        return model.log if model.log.startswith("/") else f"{self.log_dir}/{model.log}"

    def base_url(self, model: ModelSpec) -> str:
        if model.is_remote:
            return model.url
        return f"http://{probe_host(self.settings.host)}:{model.port}"


def probe_host(host: str) -> str:
    """The address to connect to for a server listening on `host` (lib.sh's probe_host, for the gateway)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


def split_words(text: str) -> list[str]:
    """`$text` unquoted in bash: split on spaces, tabs and newlines."""
    return [word for word in WORD_SEPARATOR.split(text) if word]


def label(index: int, values: Mapping[str, str]) -> str:
    name = values.get("name", "")
    return f"model #{index + 1} ({name})" if name else f"model #{index + 1}"


def key_hint(key: str) -> str:
    """'did you mean gpus?' for a near miss of a key, else the list of keys."""
    for known in MODEL_KEYS:
        if known.startswith(key) or key.startswith(known) or known.replace("_", "") == re.sub("[_-]", "", key):
            return f"did you mean {known}?"
    return "keys: " + " ".join(MODEL_KEYS)


def parse_call(index: int, words: list[str]) -> tuple[dict[str, str], list[str]]:
    """The values of one `vllm_model` call, and its problems; a refused value is left out."""
    values: dict[str, str] = {}
    problems = []
    for word in words:
        if "=" not in word:
            problems.append(f"'{word}' is not key=value")
            continue
        key, _, value = word.partition("=")
        if key not in MODEL_KEYS:
            problems.append(f"unknown key '{key}' ({key_hint(key)})")
        elif key in values:
            problems.append(f"key '{key}' given twice")
        elif "\t" in value or "\n" in value:
            # The gateway reads print_model_config.sh's lines split on tabs.
            problems.append(f"{key}= contains a tab or a newline")
        else:
            values[key] = value
    return values, [f"{label(index, values)}: {problem}" for problem in problems]


def fill_defaults(model: ModelSpec) -> None:
    if not model.id and model.name:
        # Byte by byte, as tr does: a two-byte letter becomes two underscores.
        model.id = os.fsdecode(ID_BYTE_OUTSIDE.sub(b"_", os.fsencode(model.name)))
    model.device = model.device or "gpu"
    model.log = model.log or f"{model.id}_vllm.log"
    if not model.tensor_parallel_size and model.gpus:
        model.tensor_parallel_size = str(len(model.gpus.split(",")))
    model.idle = model.idle or "none"
    if model.idle != "none" and not model.idle_after:
        model.idle_after = DEFAULT_IDLE_AFTER


def load_fleet(document: ConfigDocument, environ: Mapping[str, str], log_dir: str = "logs") -> tuple[Fleet, list[str]]:
    """The fleet of an evaluated config, defaults filled, and every static problem, one line each."""
    models, problems = [], []
    for index, words in enumerate(document.calls):
        values, call_problems = parse_call(index, words)
        models.append(ModelSpec(**values))
        problems += call_problems
    if not document.evaluated:
        problems.append(f"{document.file} could not be evaluated (bash said why above)")
    for model in models:
        fill_defaults(model)
    variables = {**environ, **document.variables}
    fleet = Fleet(
        models=models,
        settings=FleetSettings.from_variables(variables),
        bindings=list(document.bindings),
        log_dir=log_dir,
        variables=variables,
    )
    return fleet, problems + check_config(fleet)


def check_config(fleet: Fleet) -> list[str]:
    """The static checks, in the order the scripts have always reported them."""
    problems = []
    if not NUMBER.fullmatch(fleet.settings.start_interval):
        problems.append(f"VLLM_START_INTERVAL={fleet.settings.start_interval} is not a number of seconds")
    seen_id: dict[str, int] = {}
    seen_port: dict[str, int] = {}
    seen_log: dict[str, int] = {}
    for index, model in enumerate(fleet.models):
        found = []
        if not model.name:
            found.append("no name=")
        if not model.path and not model.url:
            found.append("needs path= (served here) or url= (served elsewhere)")
        duplicate_id = False
        if model.id:
            if not MODEL_ID.fullmatch(model.id):
                found.append(f"id={model.id} may only hold letters, digits, '.', '_' and '-'")
            elif model.id in seen_id:
                found.append(f"duplicate id '{model.id}' (also model #{seen_id[model.id]})")
                duplicate_id = True
            else:
                seen_id[model.id] = index + 1
        if model.url:
            if not URL.fullmatch(model.url):
                found.append(f"url={model.url} is not an http:// or https:// URL")
            if model.port:
                found.append("url= and port= exclude each other (url= is a server elsewhere)")
        else:
            if not model.port:
                if model.path:
                    found.append("no port=")
            elif not PORT.fullmatch(model.port) or not 1 <= int(model.port) <= 65535:
                found.append(f"port={model.port} is not a port number")
            elif model.port in seen_port:
                found.append(f"duplicate port {model.port} (also model #{seen_port[model.port]})")
            else:
                seen_port[model.port] = index + 1
            log = fleet.log_path(model)
            if log not in seen_log:
                seen_log[log] = index + 1
            elif not duplicate_id:  # a duplicate id already says it
                found.append(f"log {model.log} is also model #{seen_log[log]}'s log")
        if model.gpus:
            gpus = model.gpus.split(",")
            if not GPU_LIST.fullmatch(model.gpus):
                found.append(f"gpus={model.gpus} is not a comma separated list of GPU indices")
            elif len(set(gpus)) != len(gpus):
                found.append(f"gpus={model.gpus} names a GPU twice")
        if model.device == "cpu":
            if model.gpus:
                found.append("device=cpu takes no gpus=")
        elif model.device != "gpu":
            found.append(f"device={model.device} is neither gpu nor cpu")
        if model.cpus and not CPU_LIST.fullmatch(model.cpus):
            found.append(f"cpus={model.cpus} is not a CPU list like 0-15,32-47")
        for key in WHOLE_NUMBER_KEYS:
            value = model.value(key)
            if value and not POSITIVE.fullmatch(value):
                found.append(f"{key}={value} is not a positive whole number")
        if model.gpu_memory_utilization and not is_fraction(model.gpu_memory_utilization):
            found.append(f"gpu_memory_utilization={model.gpu_memory_utilization} is not a fraction in (0, 1]")
        if model.enforce_eager not in ("", "true", "false"):
            found.append(f"enforce_eager={model.enforce_eager} is neither true nor false")
        if model.aliases and not NAME_LIST.fullmatch(model.aliases):
            found.append(f"aliases={model.aliases} is not a comma separated list of names")
        for word in split_words(model.env):
            if not ENV_WORD.match(word):
                found.append(f"env= word '{word}' is not KEY=VALUE")
        found += idle_problems(model)
        for other_index, other in enumerate(fleet.models[:index]):
            if model.name and model.name == other.name and not model.url and not other.url and model.path != other.path:
                found.append(
                    f"same name as model #{other_index + 1} but another path (replicas serve the same weights)"
                )
        problems += [f"{label(index, {'name': model.name})}: {problem}" for problem in found]
    return problems


def idle_problems(model: ModelSpec) -> list[str]:
    found = []
    if model.idle not in IDLE_ACTIONS:
        found.append(f"idle={model.idle} is none, sleep or stop")
    elif model.idle != "none" and model.url:
        found.append("idle= is for servers this host runs, not for url=")
    elif model.idle == "sleep" and model.device == "cpu":
        # vLLM's is_sleep_mode_available: CUDA, ROCm and XPU; the CPU build refuses --enable-sleep-mode.
        found.append("idle=sleep needs a GPU (vLLM's sleep mode is for CUDA, ROCm and XPU): use idle=stop")
    if model.idle_after:
        if duration_seconds(model.idle_after) is None:
            found.append(f"idle_after={model.idle_after} is not a duration such as 900, 90s, 15m or 1h")
        elif model.idle == "none":
            found.append("idle_after= needs idle=sleep or idle=stop")
    return found


def duration_seconds(text: str) -> float | None:
    """Seconds of a duration above 0 (900, 90s, 15m, 1h, 1.5h), else None."""
    match = DURATION.fullmatch(text)
    if match is None:
        return None
    seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]
    return seconds if seconds > 0 else None


def is_fraction(text: str) -> bool:
    return bool(FRACTION.fullmatch(text)) and 0 < float(text) <= 1
