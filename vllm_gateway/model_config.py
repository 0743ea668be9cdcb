"""Reads the fleet's models from vllm_model_configs.sh, through the same code the scripts use.

The scripts own the format; `scripts/print_model_config.sh` evaluates the file (bash), checks it
(vllm_fleet) and prints one tab-separated line per model, so the gateway can never disagree with
what was started. It runs as a command, so the gateway does not import the fleet's package.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .settings import REPO_DIR

PRINTER = REPO_DIR / "scripts" / "print_model_config.sh"


class ModelConfigError(Exception):
    """The model config could not be read; the message is the scripts' own, one line per problem."""


@dataclass(frozen=True)
class BackendSpec:
    id: str
    name: str
    aliases: tuple[str, ...]
    path: str
    base_url: str
    api_key: str | None
    max_num_seqs: int | None
    max_concurrency: int | None = None
    remote: bool = False  # url= in the config: a server of another host, which the fleet scripts leave alone
    # It sleeps or stops once idle (the fleet's supervisor decides): the gateway tells it of every use
    # (wake_on_demand.py), and a request for it while it sleeps waits for it to wake.
    idles: bool = False
    # No api_key in the config: the fleet made the server a key of its own (run/<id>.api_key), which
    # the gateway reads there (health.py) and sends upstream. False with api_key=none or a url=.
    fleet_key: bool = False
    # Where it runs and what the console shows of it: gpu or cpu, its GPUs (0,1) and the config's CPU
    # list (empty: derived from the GPUs at start), its log file (empty for a url=), and its
    # `vllm_model` words as the fleet reads them (print_model_config.sh's config=, key included).
    device: str = "gpu"
    gpus: str = ""
    cpus: str = ""
    log_path: str = ""
    config_line: str = ""

    @property
    def capacity(self) -> int | None:
        """Requests the gateway keeps in flight to this server at most: `max_concurrency` when the
        config line gives one, else the server's `max_num_seqs`; None, no limit, when neither is set."""
        return self.max_concurrency or self.max_num_seqs


def load_backend_specs(config_file: Path) -> list[BackendSpec]:
    if not config_file.is_file():
        raise ModelConfigError(f"model config {config_file} does not exist (set VLLM_MODEL_CONFIG)")
    result = subprocess.run(
        ["bash", str(PRINTER), str(config_file)], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise ModelConfigError(result.stderr.strip() or f"{PRINTER.name} exited with {result.returncode}")
    return [parse_line(line) for line in result.stdout.splitlines() if line.startswith("model\t")]


def parse_line(line: str) -> BackendSpec:
    fields = dict(part.split("=", 1) for part in line.split("\t")[1:] if "=" in part)
    max_num_seqs = fields.get("max_num_seqs", "")
    max_concurrency = fields.get("max_concurrency", "")
    api_key = fields.get("api_key", "")
    remote = not fields.get("port")
    return BackendSpec(
        id=fields["id"],
        name=fields["name"],
        aliases=tuple(alias for alias in fields.get("aliases", "").split(",") if alias),
        path=fields.get("path", ""),
        base_url=fields["base_url"].rstrip("/"),
        api_key=api_key if api_key not in ("", "none") else None,
        max_num_seqs=int(max_num_seqs) if max_num_seqs.isdigit() else None,
        max_concurrency=int(max_concurrency) if max_concurrency.isdigit() else None,
        remote=remote,
        idles=fields.get("idle", "none") != "none",
        fleet_key=not api_key and not remote,
        device=fields.get("device") or "gpu",
        gpus=fields.get("gpus", ""),
        cpus=fields.get("cpus", ""),
        log_path=fields.get("log", ""),
        config_line=fields.get("config", ""),
    )
