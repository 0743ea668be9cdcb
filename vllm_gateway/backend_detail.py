"""What the console shows of one model server beyond its health: the CPUs the fleet bound it to, its
config line with its secrets masked, and the tail of its log with any key masked.

File reads, for the console's endpoints to run in a thread (console_api.py).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from .access_log import without_keys
from .file_tail import last_lines
from .model_config import BackendSpec

MASK = "***"
BIND_OPTION = "--physcpubind="  # numactl's, in the server's command (vllm_fleet/commands.py)
SHELL_SAFE = re.compile(r"[A-Za-z0-9_./:=,+@%^-]+")  # words the fleet leaves unquoted (commands.SAFE_WORD)
# env= words whose value is a secret by its name (HF_TOKEN=, OPENAI_API_KEY=, ...).
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)


def bound_cpus(run_dir: Path, spec: BackendSpec) -> str:
    """The CPUs the server runs on, as numactl's --physcpubind= in the command of its last start (the
    launch record run/<id>.launch.json, which `vllm_fleet plan` writes; "" when it runs unbound); for a
    server never started here, the config's cpus= ("" when it has none: derived from the GPUs at start)."""
    try:
        record = json.loads((run_dir / f"{spec.id}.launch.json").read_bytes())
    except (OSError, ValueError):
        return spec.cpus
    argv = record.get("argv") if isinstance(record, dict) else None
    if not isinstance(argv, list):
        return spec.cpus
    bound = (word for word in argv if isinstance(word, str) and word.startswith(BIND_OPTION))
    return next((word.removeprefix(BIND_OPTION) for word in bound), "")


def shown_config(spec: BackendSpec, secrets: Sequence[str]) -> str:
    """The server's `vllm_model` words (print_model_config.sh's config=) with its api_key as ***, the
    values of env= words named like a secret as ***, and anything of a key's shape masked."""
    try:
        words = shlex.split(spec.config_line)
    except ValueError:  # a quote the fleet never writes: the words as they stand
        words = spec.config_line.split()
    shown = []
    for word in words:
        key, _, value = word.partition("=")
        if key == "api_key" and value not in ("", "none"):
            shown.append(f"api_key={MASK}")
            continue
        if key == "env":
            value = " ".join(masked_variable(variable) for variable in value.split())
        word = f"{key}={value}"
        shown.append(word if SHELL_SAFE.fullmatch(word) else shlex.quote(word))
    return masked(" ".join(shown), secrets)


def masked_variable(word: str) -> str:
    name, equals, _ = word.partition("=")
    return f"{name}={MASK}" if equals and SECRET_NAME.search(name) else word


def log_tail(spec: BackendSpec, count: int, max_bytes: int, secrets: Sequence[str]) -> list[str]:
    """The last `count` lines of the server's log (none for a server of another host), oldest first,
    within its last `max_bytes`; of a progress bar's line (carriage returns), the last state."""
    if not spec.log_path:
        return []
    lines = last_lines(Path(spec.log_path), count, max_bytes)
    return [masked(line.rstrip("\r").rpartition("\r")[2], secrets) for line in lines]


def masked(text: str, secrets: Sequence[str]) -> str:
    """`text` with the server's own keys (`secrets`) and anything of a key's shape as ***: the fleet's
    keys are random words, not of the `sk-` shape access_log.without_keys finds."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return without_keys(text)
