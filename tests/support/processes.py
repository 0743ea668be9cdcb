"""Real processes for tests: free ports, process groups that always die, the vLLM simulator.

    port = free_port()
    proc = start_process([sys.executable, "-m", "http.server", str(port)], log_path=tmp / "s.log")
    wait_for_http(f"http://127.0.0.1:{port}/", timeout=10, process=proc)
    proc.stop()                          # the whole process group, SIGTERM then SIGKILL
    start_forked("simulator", [...])     # a command of tests/support/forked.py, forked: the same handle

    with Simulator.start(tmp_path, "--max-num-seqs", "2") as simulator:
        simulator.set_faults(error_status=500)
        httpx.post(simulator.base_url + "/v1/completions", json={"model": simulator.model, "prompt": "hi"})
        simulator.stats()["last_request"]["headers"], simulator.metrics()["vllm:num_requests_running"]

Every started process is also killed at interpreter exit, in case a test forgot to.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support import forked
from tests.support.clients import client_tls

REPO_ROOT = Path(__file__).resolve().parents[2]

_live: list[ProcessHandle] = []


# Ports the tests' servers take: below the kernel's ephemeral range, which port 0 and every outgoing
# connection draw from. A port drawn from that range was taken now and then, between the test's choice and
# its server's start, by a client's connection or a server bound to port 0 (once in a suite on four workers:
# "port ... is already in use").
FIRST_PORT = 10_000
PORT_PICKS = random.Random()  # its own: a test that seeds the module's generator leaves it alone


def ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, picked at random below the ephemeral
    range (so that workers choosing at once seldom meet)."""
    last = ephemeral_ports_start() - 1
    for _ in range(100):
        port = PORT_PICKS.randint(FIRST_PORT, last)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {FIRST_PORT} and {last}")


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a live process, from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces
    return fields[0], int(fields[1]), int(fields[2])


def _running(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def process_tree(root_pid: int) -> set[int]:
    """The live (non-zombie) processes in root's process group or descending from root."""
    stats = {pid: stat for pid in _all_pids() if (stat := _proc_stat(pid)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (_, parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    tree, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    tree |= {pid for pid, (_, _, group) in stats.items() if group == root_pid}
    return {pid for pid in tree if stats[pid][0] != "Z"}


class ProcessHandle:
    """A started process, leader of its own process group. `popen` is its subprocess.Popen,
    or for a fork (start_forked) an object that answers the same calls."""

    def __init__(self, popen: subprocess.Popen[bytes] | forked.ForkedProcess, log_path: Path | None) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def tree(self) -> set[int]:
        """Live pids of this process, its descendants and its process group."""
        return process_tree(self.pid)

    def _signal_all(self, sig: int, pids: Iterable[int]) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:  # descendants that left the group (rare, but vLLM spawns workers)
            if (stat := _proc_stat(pid)) is not None and stat[2] == self.pid:
                continue  # signalled with the group: a second signal could cut short its exit handlers
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the whole tree, SIGKILL what is left after `timeout`; return the exit code."""
        pids = self.tree()
        self._signal_all(signal.SIGTERM, pids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.popen.poll()  # reap the leader so it does not linger as a zombie
            if not (self.tree() | {pid for pid in pids if _running(pid)}):
                break
            time.sleep(0.05)
        else:
            self._signal_all(signal.SIGKILL, pids | self.tree())
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self in _live:
            _live.remove(self)
        return self.popen.returncode

    def __enter__(self) -> ProcessHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_process(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    log_path: str | Path | None = None,
    cwd: str | Path | None = None,
    open_files: int | None = None,
) -> ProcessHandle:
    """Start `cmd` in a process group of its own, output to `log_path` (else dropped).

    A group, not a session: the kernel's autogroups (/proc/sys/kernel/sched_autogroup_enabled) put each
    session in a scheduling group of its own and share the CPU between the groups. A vLLM generating
    flat out in a session of its own kept the test's process (in another) from running for 20-70 s at a
    time; within the test's session, the CPU is shared by thread, and the test waits milliseconds.

    `env` is added to the current environment; a value of "" is kept as the empty string.
    `open_files`: the process's RLIMIT_NOFILE, soft and hard (as `ulimit -n` in a fresh shell).
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    log_file = None
    path = Path(log_path) if log_path is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = path.open("ab")
    try:
        popen = subprocess.Popen(
            list(cmd),
            env=full_env,
            cwd=cwd or REPO_ROOT,
            process_group=0,
            preexec_fn=None if open_files is None else lambda: _limit_open_files(open_files),
            stdin=subprocess.DEVNULL,
            stdout=log_file or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
    finally:
        if log_file is not None:
            log_file.close()
    handle = ProcessHandle(popen, path)
    _live.append(handle)
    return handle


def start_forked(
    command: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    open_files: int | None = None,
) -> ProcessHandle:
    """As start_process for the command line of `command` (the gateway or the simulator), but a fork of a
    process that has imported it already (tests/support/forked.py says what that saves, and skips)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    output = log_path if log_path is not None else Path(os.devnull)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = ProcessHandle(forked.start(command, argv, full_env, output, open_files=open_files), log_path)
    _live.append(handle)
    return handle


def _limit_open_files(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@atexit.register
def _stop_leftovers() -> None:
    for handle in list(_live):
        handle.stop(timeout=3)
    forked.stop()  # after its forks: it reports how they ended


def http_status(url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None) -> int | None:
    """Status of a GET to `url`, or None when nothing answers. `context`: what https trusts, if not the system's CAs."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, ValueError):
        return None


def wait_for_http(
    url: str,
    timeout: float,
    status: int = 200,
    process: ProcessHandle | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Poll `url` until it answers `status`; fail early if `process` exits first."""
    deadline = time.monotonic() + timeout
    last: int | None = None
    while time.monotonic() < deadline:
        last = http_status(url, context=context)
        if last == status:
            return
        if process is not None and not process.alive():
            raise RuntimeError(
                f"process {process.pid} exited with {process.returncode} before "
                f"{url} answered {status}; log tail:\n{process.log_tail()}"
            )
        time.sleep(0.1)
    tail = f"; log tail:\n{process.log_tail()}" if process is not None else ""
    raise TimeoutError(f"{url} did not answer {status} within {timeout} s (last: {last}){tail}")


def wait_until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Call `check` until it returns something truthy and return that; fail after `timeout`.

    For waiting on a state (a gauge reaching 0, a process gone), never for asserting a duration.
    """
    deadline = time.monotonic() + timeout
    while not (result := _checked(check, deadline, timeout)):
        time.sleep(interval)
    return result


async def wait_until_async(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """wait_until inside a scenario's event loop: its other tasks run while this one polls."""
    deadline = time.monotonic() + timeout
    while not (result := _checked(check, deadline, timeout)):
        await asyncio.sleep(interval)
    return result


def _checked(check: Callable[[], Any], deadline: float, timeout: float) -> Any:
    """`check()`'s result; a TimeoutError when it is still falsy once `deadline` has passed."""
    result = check()
    if not result and time.monotonic() >= deadline:
        raise TimeoutError(f"condition not met within {timeout} s (last: {result!r})")
    return result


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name: value}, summing the series of a name over its labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, value = line[: line.index("{")], line[line.rindex("}") + 1 :].split()[0]
        else:
            name, value = line.split()[:2]
        values[name] = values.get(name, 0.0) + float(value)
    return values


class Simulator:
    """A vLLM simulator process on a free port (see vllm_simulator/)."""

    def __init__(self, handle: ProcessHandle, port: int, model: str) -> None:
        self.handle = handle
        self.port = port
        self.model = model
        self.base_url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(
        cls,
        log_dir: str | Path,
        *args: str,
        model: str = "sim",
        python: str = sys.executable,
        wait: bool = True,
        timeout: float = 30.0,
        port: int | None = None,
    ) -> Simulator:
        """Start with `--served-model-name model` plus `args`, wait for /health unless told not to.

        The pace defaults to fast (no first-token delay, 1000 tokens/s); pass the flags to change it.
        """
        port = port or free_port()
        argv = [
            "--port",
            str(port),
            "--served-model-name",
            model,
            "--first-token-delay",
            "0",
            "--token-rate",
            "1000",
            *args,
        ]
        log_path = Path(log_dir) / f"simulator-{port}.log"
        if python == sys.executable:
            handle = start_forked("simulator", argv, log_path=log_path)
        else:
            handle = start_process([python, "-m", "vllm_simulator", *argv], log_path=log_path)
        simulator = cls(handle, port, model)
        if wait:
            try:
                # /version, not /health: a health fault given on the command line must not block.
                wait_for_http(simulator.base_url + "/version", timeout, process=handle)
            except BaseException:
                handle.stop()
                raise
        return simulator

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        response = httpx.request(method, self.base_url + path, json=body, timeout=10, verify=client_tls())
        response.raise_for_status()
        return response.json() if response.content else None

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Replace the active faults, e.g. set_faults(error_status=500, slow_start=1.0)."""
        return self._call("POST", "/_simulator/faults", faults)

    def clear_faults(self) -> None:
        self._call("DELETE", "/_simulator/faults")

    def stats(self) -> dict[str, Any]:
        """Requests per path, running, waiting, aborted, completed, crashed, last_request, ..."""
        return self._call("GET", "/_simulator/stats")

    def reset_stats(self) -> None:
        self._call("DELETE", "/_simulator/stats")

    def metrics(self) -> dict[str, float]:
        import httpx

        response = httpx.get(self.base_url + "/metrics", timeout=10, verify=client_tls())
        response.raise_for_status()
        return parse_metrics(response.text)

    def running(self) -> float:
        """The requests its engine is generating for now, as its metrics say (as vLLM's would)."""
        return self.metrics()["vllm:num_requests_running"]

    def alive(self) -> bool:
        return self.handle.alive()

    def stop(self) -> int | None:
        return self.handle.stop()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
