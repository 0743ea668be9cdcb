"""What the simulator is told at start: the model's names, the simulated engine's pace and limits, sleep mode.

Built once from the command line (cli.py); it never changes while serving.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimulatorConfig:
    served_model_names: tuple[str, ...]
    model_path: str
    max_model_len: int = 4096
    max_num_seqs: int = 8
    first_token_delay: float = 0.05
    token_rate: float = 200.0
    api_key: str | None = None
    # VLLM_SERVER_DEV_MODE=1 at start: vLLM's development routes (here /sleep, /wake_up, /is_sleeping).
    dev_mode: bool = False
    enable_sleep_mode: bool = False
    # How long a level-1 sleep and a full wake take for a mid-size model: the weights copied to host
    # memory and back.
    sleep_seconds: float = 1.0
    wake_seconds: float = 2.0
