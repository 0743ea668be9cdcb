"""A real vLLM OpenAI server (the CPU build in .venv-vllm) serving the tiny model, for end-to-end tests.

    server = start_real_vllm(free_port(), "tiny", tiny_model_dir(), tmp_path / "vllm.log")
    ...                                   # server.base_url speaks vLLM's own API
    server.stop()                         # API server, EngineCore and workers: the whole tree

Start-up takes 20-40 s on two cores and each server holds about 3 GB of RAM, so share one per session.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import REPO_ROOT, ProcessHandle, start_process, wait_for_http
from tests.support.tiny_model import DEFAULT_DIR, is_complete

STARTUP_TIMEOUT = 300.0

# The settings known to work on a small CPU-only machine: a 1 GB KV cache, fp32, the tiny model's
# whole context (65,536 tokens, for a generation long enough that an abort visibly cuts it short), and
# no torch.compile (--enforce-eager), which takes seconds of every start here and speeds nothing up that
# the tests measure.
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
VLLM_ARGS = ("--max-model-len", "65536", "--max-num-seqs", "8", "--dtype", "float32", "--enforce-eager")


def vllm_python() -> str:
    """The interpreter that has vLLM: $VLLM_PYTHON, else the repo's .venv-vllm."""
    return os.environ.get("VLLM_PYTHON") or str(REPO_ROOT / ".venv-vllm" / "bin" / "python")


def tiny_model_dir(directory: str | Path = DEFAULT_DIR) -> str:
    """Path of the tiny model, generating it with the vLLM interpreter if it is not there yet."""
    if not is_complete(directory):
        subprocess.run(
            [vllm_python(), str(REPO_ROOT / "tests" / "support" / "tiny_model.py"), str(directory)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return str(Path(directory).resolve())


@dataclass
class RealVllm:
    handle: ProcessHandle
    port: int
    served_name: str
    startup_seconds: float

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> int | None:
        return self.handle.stop(timeout=30)


def start_real_vllm(
    port: int, served_name: str, model_dir: str | Path, log_path: str | Path, extra_args: Sequence[str] = ()
) -> RealVllm:
    """Start vLLM's OpenAI server on 127.0.0.1:`port` and wait until /health answers 200."""
    cmd = [
        vllm_python(),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *VLLM_ARGS,
        *extra_args,
    ]
    started = time.monotonic()
    handle = start_process(cmd, env=VLLM_ENV, log_path=log_path)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", STARTUP_TIMEOUT, process=handle)
    except BaseException:
        handle.stop(timeout=30)
        raise
    return RealVllm(handle, port, served_name, time.monotonic() - started)
