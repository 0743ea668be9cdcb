"""What the simulator is told at start: the model's names and the simulated engine's pace and limits.

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
