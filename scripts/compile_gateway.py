"""Compile the gateway's request path with mypyc, into a build of its own that vllm_api_server.py runs.

Every relayed request runs the same few thousand lines (the HTTP server, the relay, the meters and
limits); run as CPython bytecode, they cost 17% more instructions per request than the relay with fewer
features did at 6f66452 (docs/performance.md). mypyc turns those typed modules into C extensions, which
run the same code without most of the interpreter's work: 29% fewer instructions per request. The
sources stay the project's only code: the build is a copy of the package, with the modules of
HOT_MODULES compiled beside their .py files, under .build/compiled/ (not tracked).

vllm_api_server.py uses the build while it matches the sources (the digest in its SOURCE_STAMP),
unless GATEWAY_COMPILED=0; pure Python otherwise. `--check` says whether the build is current.

Usage: python scripts/compile_gateway.py [--check]      (scripts/install.sh runs it)
Exit status: 0 built (or current), 1 the build failed (or, with --check, is missing or stale).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from vllm_api_server import BUILD_DIR, SOURCE_DIR, SOURCE_STAMP, source_digest  # noqa: E402

# What runs for every relayed request: compiling the rest (start-up, the admin API, the console)
# would only lengthen the build.
HOT_MODULES = (
    "proxy.py",
    "outcome.py",
    "upstream.py",
    "stream_usage.py",
    "usage_scan.py",
    "usage_ledger.py",
    "request_body.py",
    "ratelimit.py",
    "access.py",
    "access_log.py",
    "admission/local.py",
    "metrics/recording.py",
    "server/exchange.py",
    "server/reader.py",
    "server/protocol.py",
    "server/timers.py",
    "server/flow.py",
)


def build() -> None:
    """Compile into a fresh folder beside the build, then put it in the build's place: a failed or
    interrupted build leaves the last good one (or none), never half of one."""
    BUILD_DIR.parent.mkdir(parents=True, exist_ok=True)
    digest = source_digest()
    with tempfile.TemporaryDirectory(dir=BUILD_DIR.parent, prefix="compiling-") as scratch:
        work = Path(scratch) / "compiled"
        shutil.copytree(SOURCE_DIR, work / SOURCE_DIR.name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        modules = [f"{SOURCE_DIR.name}/{module}" for module in HOT_MODULES]
        # mypyc type-checks what it compiles, with mypy's defaults: the project's strict settings are
        # for its own mypy run, and mypy would otherwise find them in pyproject.toml above this folder.
        (work / "mypy.ini").write_text("[mypy]\n")
        done = subprocess.run(
            [sys.executable, "-m", "mypyc", "--config-file", "mypy.ini", *modules],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"compile_gateway: mypyc failed (exit {done.returncode})")
        shutil.rmtree(work / "build")  # setuptools' C sources and objects
        (work / "mypy.ini").unlink()
        # The sources' digest (what vllm_api_server.py checks), then what was compiled of them.
        (work / SOURCE_STAMP).write_text(f"{digest}\n{' '.join(HOT_MODULES)}\n")
        if BUILD_DIR.exists():
            shutil.rmtree(BUILD_DIR)
        work.rename(BUILD_DIR)


def is_current() -> bool:
    """Built from these sources, with these modules compiled."""
    stamp = BUILD_DIR / SOURCE_STAMP
    return stamp.exists() and stamp.read_text().split("\n")[:2] == [source_digest(), " ".join(HOT_MODULES)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/compile_gateway.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 0 when the build is current, else 1")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if is_current() else 1
    if is_current():
        print(f"compile_gateway: {BUILD_DIR.relative_to(REPO_DIR)} is current")
        return 0
    build()
    print(f"compile_gateway: built {BUILD_DIR.relative_to(REPO_DIR)} ({len(HOT_MODULES)} modules compiled)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
