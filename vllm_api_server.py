#!/usr/bin/env python3
"""The vLLM API gateway: `python3 vllm_api_server.py [serve|models|keys|...] --help`.

Server settings (port 1024, concurrency 100, keep-alive 300 s, httptools, 20 requests/minute per key,
...) are declared in vllm_gateway/settings.py and set through GATEWAY_* environment variables.
"""

import importlib.util
import os
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
VENV_DIR = REPO_DIR / ".venv"
# What the gateway imports from requirements.txt (some only when a command needs it).
NEEDED = ("fastapi", "uvicorn", "httptools", "uvloop", "pydantic", "pydantic_settings", "limits", "redis", "orjson")


def run_in_venv_if_needed(missing: str) -> None:
    """The README and the first-start banner print `python3 vllm_api_server.py ...`: from a plain shell
    that python lacks the gateway's packages, which the repo's .venv (scripts/install.sh) has."""
    python = VENV_DIR / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != VENV_DIR.resolve():
        os.execv(python, [str(python), __file__, *sys.argv[1:]])
    sys.exit(
        f"vllm_api_server: the Python package `{missing}` is missing; `bash scripts/install.sh` "
        f"installs everything into {VENV_DIR}"
    )


if __name__ == "__main__":
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        run_in_venv_if_needed(missing[0])
    from vllm_gateway.cli import main

    sys.exit(main())
