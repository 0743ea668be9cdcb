#!/usr/bin/env python3
"""The vLLM API gateway: `python3 vllm_api_server.py [serve|models|keys|...] --help`.

Server settings (port 1024, concurrency 100, keep-alive 300 s, httptools, 20 requests/minute per key,
...) are declared in vllm_gateway/settings.py and set through GATEWAY_* environment variables.
"""

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
VENV_DIR = REPO_DIR / ".venv"
SOURCE_DIR = REPO_DIR / "vllm_gateway"
# The package with its request path compiled by mypyc (scripts/compile_gateway.py), and the file in it
# that names the sources it was built from.
BUILD_DIR = REPO_DIR / ".build" / "compiled"
SOURCE_STAMP = "source.sha256"
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


def source_digest() -> str:
    """Of every file of the package (names and contents), as the build records it."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".so":
            digest.update(str(path.relative_to(SOURCE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def choose_build() -> None:
    """Import the gateway from the compiled build while it matches the sources: GATEWAY_COMPILED=auto
    (the default). =1 requires it (and exits when it is missing or stale), =0 runs the sources."""
    wanted = os.environ.get("GATEWAY_COMPILED", "auto").strip().lower()
    if wanted not in ("auto", "1", "0"):
        sys.exit(f"vllm_api_server: GATEWAY_COMPILED must be auto, 1 or 0, not {wanted!r}")
    if wanted == "0":
        return
    stamp = BUILD_DIR / SOURCE_STAMP
    built_from = stamp.read_text().split("\n")[0] if stamp.exists() else None
    if built_from is not None and built_from == source_digest():
        sys.path.insert(0, str(BUILD_DIR))
        return
    if wanted == "1":
        state = "missing" if built_from is None else "older than the sources"
        sys.exit(f"vllm_api_server: GATEWAY_COMPILED=1, but the compiled build is {state}: run scripts/install.sh")
    if built_from is not None:
        print(
            "vllm_api_server: the compiled build is older than the sources, so they run as Python: "
            "scripts/install.sh compiles them again",
            file=sys.stderr,
        )


if __name__ == "__main__":
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        run_in_venv_if_needed(missing[0])
    choose_build()
    from vllm_gateway.cli import main

    sys.exit(main())
