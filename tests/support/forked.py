"""The gateway, its command line and the simulator started as forks of a process that imported them.

A gateway started as `python vllm_api_server.py serve` spends about 0.4 s of CPU before it answers, 0.64 s
under coverage, nearly all of it importing (pydantic, FastAPI, uvicorn, the gateway); a key CLI run 0.24 s,
a simulator 0.26 s. The suite starts about 200 gateways, 150 CLI runs and 190 simulators, so on two cores
those imports were minutes of the suite. Here, one fork server per test process (multiprocessing's
"forkserver": a fresh interpreter that never ran a test, no threads) imports them once, and each start is
a fork of it: 0.11 s for a gateway.

The forked process is set up as start_process starts a command: a process group of its own, the
test's environment, the repository as working directory, the descriptor limit it asks for, output to a
file and nothing on stdin. Then it calls the main function that the command line calls, and ends as the
interpreter would (threads joined, exit handlers run, the exit status of main or of SystemExit).

What a fork skips is the first step of vllm_api_server.py, the check for the gateway's packages (and the
re-exec into .venv), which tests/test_entry_point.py runs as a command. The choice between the compiled
build and the sources it makes again, but the fork server has imported the suite's build already, so a
start whose GATEWAY_COMPILED differs from the suite's runs as a command.

`ps` shows a fork with the fork server's command line (`python -c from multiprocessing.forkserver ...`);
its log and its ProcessHandle say what it is.

Under coverage (scripts/test.sh), the fork server starts coverage at its first import of vllm_gateway
(tests/support/coverage_hook.py); pyproject.toml's `patch = ["fork"]` gives each fork a coverage of its
own, saved by the exit handlers.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import multiprocessing.util  # its exit handler, before processes.py's: see stop()
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# What each command runs: its main function, the program name its own command line would have, and
# whether coverage measures it (it measures vllm_gateway, which the simulator never runs).
COMMANDS = {
    "gateway": ("vllm_gateway.cli", "main", REPO_ROOT / "vllm_api_server.py", True),
    "simulator": ("vllm_simulator.cli", "main", REPO_ROOT / "vllm_simulator" / "__main__.py", False),
}
# Imported once by the fork server: the suite's build of the gateway first (Python 3.11's fork server
# does not take on the test process's sys.path, where tests/conftest.py chose it), then what a gateway's
# `serve` and a simulator import before they answer.
PRELOAD = [
    "tests.support.suite_build",
    "vllm_gateway.cli",
    "vllm_gateway.app",
    "uvicorn",
    "vllm_simulator.cli",
    "tests.support.forked",
]

_context: ForkServerContext | None = None


def suite_build_setting() -> str:
    """The build this process imports (tests/conftest.py): GATEWAY_COMPILED as the suite runs it."""
    return os.environ.get("GATEWAY_COMPILED", "auto")


def can_fork(env: Mapping[str, str]) -> bool:
    """Whether a gateway with `env` runs the build the fork server imported."""
    suites = suite_build_setting()
    return suites in ("0", "1") and env.get("GATEWAY_COMPILED", suites) == suites


def _fork_server() -> ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def stop() -> None:
    """End the fork server, if one runs, and wait until it has: under coverage it saves its data as it
    ends (the lines its imports ran), and scripts/test.sh combines the data as soon as pytest returns.
    Its forks live on; it stops reporting their exit. processes.py calls this from its exit handler once
    it has stopped every process a test left; multiprocessing's own exit handler, which would otherwise
    wait for those forks forever, runs after it (registered earlier, when this module imported it)."""
    if _context is not None:
        from multiprocessing import forkserver

        forkserver._forkserver._stop()  # type: ignore[attr-defined]  # the one way there is


class ForkedProcess:
    """A forked command, answering the calls that tests make of a subprocess.Popen."""

    def __init__(self, process: BaseProcess, args: Sequence[str]) -> None:
        self.process = process
        self.args = list(args)
        assert process.pid is not None
        self.pid: int = process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # negative for a signal, as Popen's

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)


def start(
    command: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    stdout: Path,
    stderr: Path | None = None,
    cwd: str | Path | None = None,
    open_files: int | None = None,
) -> ForkedProcess:
    """Fork `command` (a key of COMMANDS) with `argv`, the whole environment `env`, output appended to
    `stdout` (and `stderr`, else the same file)."""
    process = _fork_server().Process(
        target=_run,
        args=(command, list(argv), dict(env), str(cwd or REPO_ROOT), str(stdout), str(stderr or stdout), open_files),
        name=command,
    )
    process.start()
    return ForkedProcess(process, [command, *argv])


def run(command: str, argv: Sequence[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `command` to its end, as subprocess.run(..., capture_output=True, text=True) would."""
    with tempfile.TemporaryDirectory(prefix="forked-") as directory:
        stdout, stderr = Path(directory) / "stdout", Path(directory) / "stderr"
        child = start(command, argv, env, stdout, stderr)
        try:
            status = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            raise
        return subprocess.CompletedProcess(child.args, status, stdout.read_text(), stderr.read_text())


# -- in the forked process --


def _run(
    command: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    stdout: str,
    stderr: str,
    open_files: int | None,
) -> None:
    os.setpgid(0, 0)
    _redirect(0, os.devnull, os.O_RDONLY)
    _redirect(1, stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _redirect(2, stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    # multiprocessing gave the child a sys.stdin on a descriptor of its own; a command's is descriptor 0,
    # which uvicorn hands on to the workers it spawns.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if open_files is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    module, function, program, measured = COMMANDS[command]
    if not measured:
        _stop_coverage()
    sys.argv = [str(program), *argv]
    # vllm_api_server.py's choice of build, as the command makes it: sys.path came from the test process,
    # where a test may have put the sources first (importing scripts/compile_gateway.py does), and what
    # the command imports later, and the workers it spawns, take the build from there.
    from vllm_api_server import choose_build

    choose_build()
    main = getattr(importlib.import_module(module), function)
    try:
        status = main(argv)
    finally:
        # What the interpreter does at its exit, which a multiprocessing child skips (it ends with
        # os._exit): wait for the threads that are not daemons, then run the exit handlers (logging's
        # flush, coverage's save).
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    raise SystemExit(status)


def _stop_coverage() -> None:
    """No coverage for a command that runs none of vllm_gateway, as the hook would start none in its own
    process: the one that patch=fork started in this fork ends here, unsaved (as coverage ends its
    parent's in a fork), so that it neither slows the command nor leaves a data file."""
    coverage = sys.modules.get("coverage")
    current = coverage.Coverage.current() if coverage is not None else None
    if current is not None:
        current.stop()
        current._auto_save = False


def _redirect(fd: int, path: str, flags: int) -> None:
    opened = os.open(path, flags, 0o644)
    os.dup2(opened, fd)
    os.close(opened)
