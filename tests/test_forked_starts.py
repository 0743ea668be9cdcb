"""The suite's gateways and CLI runs are forks of a process that imported them (tests/support/forked.py):
each behaves as the command it stands for, `python vllm_api_server.py ...` started by start_process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support import forked
from tests.support.gateway import command_run, gateway_env, write_model_config
from tests.support.gateway import test_key as add_key
from tests.support.processes import REPO_ROOT, ProcessHandle, free_port, start_forked, wait_for_http


@pytest.fixture
def key_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, **gateway_env(tmp_path, free_port())}
    add_key(env, "admin", admin=True)
    add_key(env, "reader")
    return env


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "list", "--json"],  # output, status 0
        ["keys", "update", "nobody", "--weight", "2"],  # a refusal on stderr, status 1
        ["keys", "create", "--name", "x", "--weight", "heavy"],  # argparse's usage error, status 2
        ["keys", "--help"],  # argparse's help and its SystemExit(0)
    ],
)
def test_a_forked_cli_run_prints_and_ends_as_the_command_does(key_env: dict[str, str], args: list[str]) -> None:
    by_fork = forked.run("gateway", args, key_env, timeout=60)
    by_command = command_run(key_env, args)
    assert (by_fork.returncode, by_fork.stdout, by_fork.stderr) == (
        by_command.returncode,
        by_command.stdout,
        by_command.stderr,
    )
    assert by_fork.stdout or by_fork.stderr


def forked_gateway(workdir: Path, open_files: int | None = None) -> tuple[ProcessHandle, int]:
    """A gateway without models, forked, and its port."""
    port = free_port()
    env = gateway_env(workdir, port)
    write_model_config(Path(env["VLLM_MODEL_CONFIG"]), [])
    add_key(env, "admin", admin=True)
    return start_forked("gateway", ["serve"], env, workdir / "gateway.log", open_files=open_files), port


def test_a_forked_gateway_leads_its_own_process_group_with_its_environment_directory_and_limit(tmp_path: Path) -> None:
    handle, port = forked_gateway(tmp_path, open_files=300)
    try:
        # It answers on the port its environment names (/proc/PID/environ shows the fork server's).
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=30, process=handle)
        # A group of its own in the test's session, as start_process makes one (its docstring says why).
        assert os.getpgid(handle.pid) == handle.pid and os.getsid(handle.pid) == os.getsid(0)
        assert os.readlink(f"/proc/{handle.pid}/cwd") == str(REPO_ROOT)
        limits = Path(f"/proc/{handle.pid}/limits").read_text()
        assert next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3:5] == [
            "300",
            "300",
        ]
        assert os.readlink(f"/proc/{handle.pid}/fd/0") == os.devnull
    finally:
        status = handle.stop()
    assert status == 0  # SIGTERM: the gateway's handler exits through Python, as the command does
    assert f":{port}" in (tmp_path / "gateway.log").read_text()  # its output went to its log


def test_a_forked_gateway_killed_by_a_signal_reports_it_as_popen_does(tmp_path: Path) -> None:
    handle, port = forked_gateway(tmp_path)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=30, process=handle)
        handle.popen.send_signal(signal.SIGKILL)
        assert handle.popen.wait(timeout=10) == -signal.SIGKILL
        assert not handle.alive()
    finally:
        handle.stop()
