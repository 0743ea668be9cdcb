"""vllm_api_server.py works as the README and the first-start banner print it: `python3 vllm_api_server.py
...` from a plain shell, whose python lacks the gateway's packages, runs in the repo's .venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python with nothing but the standard library, as on a fresh shell."""
    directory = tmp_path_factory.mktemp("bare")
    venv.create(directory, with_pip=False, system_site_packages=False)
    python = directory / "bin" / "python"
    probe = subprocess.run([python, "-c", "import fastapi"], capture_output=True)
    assert probe.returncode != 0, "the bare venv should not see fastapi"
    return python


def test_a_python_without_the_packages_runs_the_command_in_the_repos_venv(bare_python, tmp_path):
    env = {**os.environ, "GATEWAY_KEY_FILE": str(tmp_path / "keys.json"), "GATEWAY_ENV_FILE": "/nonexistent"}
    created = subprocess.run(
        [bare_python, REPO_ROOT / "vllm_api_server.py", "keys", "create", "--name", "newcomer", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["name"] == "newcomer"
    listed = subprocess.run(
        [bare_python, REPO_ROOT / "vllm_api_server.py", "keys", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert "newcomer" in listed.stdout


def test_the_entry_runs_in_place_when_its_python_has_the_packages(tmp_path):
    result = subprocess.run(
        [sys.executable, REPO_ROOT / "vllm_api_server.py", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "keys" in result.stdout


@pytest.mark.parametrize("command", ["vllm-gateway", "vllm-simulator"])
def test_the_install_gives_the_venv_its_console_scripts(command):
    script = Path(sys.executable).parent / command
    assert script.exists(), f"{script}: scripts/install*.sh install the project into .venv"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage:" in result.stdout
