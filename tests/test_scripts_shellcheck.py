"""Every shell script of the project passes shellcheck, and answers --help."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.processes import REPO_ROOT

SCRIPTS = sorted(
    [
        *REPO_ROOT.glob("*.sh"),
        *REPO_ROOT.glob("scripts/*.sh"),
        *REPO_ROOT.glob("benchmarks/*.sh"),
        *REPO_ROOT.glob("tests/gpu_host/*.sh"),
        REPO_ROOT / ".ci" / "run",
    ]
)


def test_every_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: scripts/install_test_deps.sh installs it"
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    "script", [s for s in SCRIPTS if s.parent == REPO_ROOT and s.name != "vllm_model_configs.sh"], ids=lambda s: s.name
)
def test_every_top_level_script_answers_help(script):
    result = subprocess.run(["bash", str(script), "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    assert "Usage:" in result.stdout + result.stderr
