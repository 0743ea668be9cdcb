"""Each model server's command: its environment, its command line, the numactl binding around it, and
the shell text a dry run prints and a log's header records.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .config import MODEL_KEYS, Fleet, ModelSpec, split_words
from .placement import Place

# The thread counts follow the model's CPU set; the rest is the spec's tuning. A variable of the
# same name in the environment or the config file replaces the default, a model's env= word wins.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMEXPR_MAX_THREADS",
    "TORCH_CPU_CORES",
)
TUNING_BEFORE_BIND = (("TOKENIZERS_PARALLELISM", "true"), ("CUDA_DEVICE_MAX_CONNECTIONS", "16"))
TUNING_AFTER_BIND = (
    ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
    ("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1"),
    ("KMP_AFFINITY", "granularity=fine,compact,1,0"),
    ("KMP_BLOCKTIME", "0"),
    ("OMP_SCHEDULE", "dynamic"),
)

# Variables of the scripts that vLLM would take for misspelt settings of its own and warn about.
FLEET_VARIABLES = (
    "VLLM_MODEL_CONFIG",
    "VLLM_LOG_DIR",
    "VLLM_RUN_DIR",
    "VLLM_START_INTERVAL",
    "VLLM_START_TIMEOUT",
    "VLLM_STOP_TIMEOUT",
    "VLLM_SIMULATE",
    "VLLM_LAUNCH_COMMAND",
    "VLLM_HOST",
    "VLLM_NUMACTL",
    "VLLM_LOG_KEEP",
    "VLLM_PROGRESS_INTERVAL",
    "VLLM_RESTART_DELAY",
    "VLLM_RESTART_DELAY_MAX",
    "VLLM_RESTART_RESET_AFTER",
    "VLLM_CRASH_LOOP_EXITS",
    "VLLM_CRASH_LOOP_WINDOW",
    "VLLM_HANG_CHECKS",
    "VLLM_HEALTH_CHECK_INTERVAL",
)

SIMULATOR_MODULE = "vllm_simulator"
SAFE_WORD = re.compile(r"[A-Za-z0-9_./:=,+@%^-]+")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
API_KEY_VALUE = re.compile(r"(--api-key )[^ ]+")


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]  # setsid env ... [numactl ...] server ...
    place_text: str  # the binding in a few words, for messages and the dry run's header
    warning: str = ""  # said when the model starts: why it runs unbound though numactl is there


def model_env(model: ModelSpec, threads: str, cpus: str, variables: Mapping[str, str]) -> list[str]:
    """KEY=VALUE words: the model's GPUs, the tuning (threads from its CPU set), then its env= words."""
    env = []
    if model.device == "gpu" and model.gpus:
        env.append(f"CUDA_VISIBLE_DEVICES={model.gpus}")  # the model's GPUs, whatever the caller had
    defaults = [(name, threads) for name in THREAD_VARIABLES]
    defaults += [*TUNING_BEFORE_BIND, ("VLLM_CPU_OMP_THREADS_BIND", cpus or "auto"), *TUNING_AFTER_BIND]
    env += [f"{name}={variables.get(name, default)}" for name, default in defaults]
    if model.idle == "sleep":
        env.append("VLLM_SERVER_DEV_MODE=1")  # vLLM serves /sleep and /wake_up only in its dev mode
    for word in split_words(model.env):
        name = word.partition("=")[0]
        if any(existing.partition("=")[0] == name for existing in env):
            env = [word if existing.partition("=")[0] == name else existing for existing in env]
        else:
            env.append(word)
    return env


def model_argv(model: ModelSpec, fleet: Fleet, simulate: bool, python: str) -> list[str]:
    """The server's command line: vLLM's OpenAI server, or the simulator standing in for it."""
    names = [model.name, *(model.aliases.split(",") if model.aliases else [])]
    if simulate:
        argv = [
            python,
            "-m",
            SIMULATOR_MODULE,
            "--model",
            model.path,
            "--served-model-name",
            *names,
            "--host",
            fleet.settings.host,
            "--port",
            model.port,
        ]
        argv += option("--max-num-seqs", model.max_num_seqs)
        argv += option("--max-model-len", model.max_model_len)
        argv += sleep_mode(model)
        return argv + split_words(model.simulate_args)  # vLLM's extra_args would be unknown to it
    # The words of its first line, as bash's `read -a` split it.
    launch = split_words((model.launch_command or fleet.settings.launch_command).partition("\n")[0])
    # `vllm serve MODEL`, or `python -m vllm.entrypoints.openai.api_server --model MODEL`
    weights = [model.path] if launch[-1:] == ["serve"] else ["--model", model.path]
    argv = [*launch, *weights, "--served-model-name", *names, "--host", fleet.settings.host, "--port", model.port]
    argv += option("--tensor-parallel-size", model.tensor_parallel_size)
    argv += option("--gpu-memory-utilization", model.gpu_memory_utilization)
    argv += option("--max-model-len", model.max_model_len)
    argv += option("--max-num-seqs", model.max_num_seqs)
    if model.enforce_eager == "true":
        argv.append("--enforce-eager")
    argv += option("--max-parallel-loading-workers", model.load_workers)
    argv += sleep_mode(model)
    # extra_args is split on white space (no quotes): JSON values are written without spaces.
    return argv + split_words(model.extra_args)


def sleep_mode(model: ModelSpec) -> list[str]:
    """A model that sleeps when idle needs it from its start: vLLM sets its memory up for offloading."""
    return ["--enable-sleep-mode"] if model.idle == "sleep" else []


def option(flag: str, value: str) -> list[str]:
    return [flag, value] if value else []


def unset_words(environ: Mapping[str, str]) -> list[str]:
    """`env -u` words for the scripts' own settings exported to us."""
    return [word for name in FLEET_VARIABLES if name in environ for word in ("-u", name)]


def server_command(
    model: ModelSpec,
    fleet: Fleet,
    place: Place,
    *,
    simulate: bool,
    numactl: str,
    online_count: str,
    python: str,
    environ: Mapping[str, str],
) -> ServerCommand:
    """setsid env ... [numactl --physcpubind=CPUS [--membind=NODES]] SERVER ...; numactl empty: no binding."""
    bound = bool(place.cpus and numactl)
    cpus = place.cpus if bound else ""
    threads = str(place.count) if bound else online_count
    argv = ["setsid", "env", *unset_words(environ), *model_env(model, threads, cpus, fleet.variables)]
    warning = ""
    if bound:
        argv += [numactl, f"--physcpubind={cpus}", *([f"--membind={place.nodes}"] if place.nodes else [])]
        memory = f", memory node {place.nodes}" if place.nodes else ""
        place_text = f"CPUs {cpus}{memory} ({place.note})"
    elif place.cpus:
        place_text = "unbound (no numactl)"
    else:
        place_text = f"unbound ({place.note})" if place.note else "unbound"
        if numactl and not simulate:
            warning = f"{model.id} runs without CPU binding: {place.note or 'no CPU set'}"
    return ServerCommand(argv + model_argv(model, fleet, simulate, python), place_text, warning)


def shell_word(word: str) -> str:
    """The word quoted for a shell, only when it needs it."""
    if SAFE_WORD.fullmatch(word):
        return word
    return "'" + word.replace("'", "'\\''") + "'"


def config_line(model: ModelSpec) -> str:
    """The model's `vllm_model` words as the fleet reads them (defaults filled, unset keys left out),
    each quoted for bash when it needs it, for the gateway's console."""
    return " ".join(shell_word(f"{key}={value}") for key in MODEL_KEYS if (value := model.value(key)))


def command_text(log: str, argv: list[str]) -> str:
    """argv as a shell runs it in the background with its output going to log; the words after `env`
    (-u NAME and NAME=VALUE) one a line, so the environment reads as a list."""
    text = ""
    k = 0
    while k < len(argv):
        if text:
            text += " "
        text += shell_word(argv[k])
        k += 1
        if argv[k - 1] != "env":
            continue
        while k < len(argv):
            if argv[k] == "-u":
                text += " \\\n    -u " + (argv[k + 1] if k + 1 < len(argv) else "")
                k += 2
            elif ASSIGNMENT.match(argv[k]):
                text += " \\\n    " + shell_word(argv[k])
                k += 1
            else:
                break
        text += " \\\n "
    return f"{text} \\\n  >> {shell_word(log)} 2>&1 < /dev/null &\n"


def without_api_keys(text: str) -> str:
    """The text with every line's first --api-key value as ***, for logs."""
    return "\n".join(API_KEY_VALUE.sub(r"\1***", line, count=1) for line in text.split("\n"))
