"""The install scripts' choice of interpreter (scripts/install_lib.sh pick_python, scripts/python_speed.py):
PYTHON when set, else the fastest Python 3.11+ found, as measured on the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO_ROOT


def bash(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`script` run after sourcing scripts/install_lib.sh, from the repository root."""
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source scripts/install_lib.sh; {script}"],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def stub_python(directory: Path, name: str, report: str, status: int = 0) -> Path:
    """An executable standing for an interpreter: it answers python_speed.py with `report`."""
    path = directory / name
    path.write_text(f"#!/bin/sh\necho '{report}'\nexit {status}\n")
    path.chmod(0o755)
    return path


def test_python_speed_names_the_interpreter_file_its_version_and_a_time() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "python_speed.py")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    executable, version, micros = done.stdout.split()
    assert executable == os.path.realpath(sys.executable)
    assert version == sys.version.split()[0]
    assert int(micros) > 0


def test_python_set_by_the_user_is_used_and_nothing_is_timed(tmp_path: Path) -> None:
    timed = tmp_path / "timed"
    stub = stub_python(tmp_path, "py", f"{tmp_path}/py 3.11.9 10")
    stub.write_text(f"#!/bin/sh\ntouch {timed}\necho x 3.11.9 10\n")
    done = bash(f"PYTHON_CANDIDATES=({stub}); pick_python", env={"PYTHON": "/opt/my/python3"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "/opt/my/python3"
    assert not timed.exists()


def test_the_fastest_interpreter_that_can_make_a_venv_is_picked_and_each_found_is_said_once(tmp_path: Path) -> None:
    slow = stub_python(tmp_path, "slow", "/usr/lib/slow/python3.11 3.11.7 5000")
    fast = stub_python(tmp_path, "fast", "/usr/lib/fast/python3.11 3.11.2 3600")
    same_as_fast = stub_python(tmp_path, "fast-link", "/usr/lib/fast/python3.11 3.11.2 3500")
    too_old = stub_python(tmp_path, "old", "", status=1)  # python_speed.py refuses 3.10 and older
    done = bash(
        f"PYTHON_CANDIDATES=({too_old} {slow} {fast} {same_as_fast} /no/such/python3); pick_python",
        env={"PYTHON": ""},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "/usr/lib/fast/python3.11"
    assert done.stderr.count("found Python") == 2, done.stderr
    assert "3.11.7 at /usr/lib/slow/python3.11: 5000 us" in done.stderr


def test_each_interpreter_is_judged_by_its_best_round_so_one_slow_moment_does_not_decide(tmp_path: Path) -> None:
    steady = stub_python(tmp_path, "steady", "/usr/lib/steady/python3.11 3.11.7 3000")
    calls = tmp_path / "calls"
    unlucky = tmp_path / "unlucky"
    # Its first round falls on a busy moment of the machine; the later ones do not.
    unlucky.write_text(
        f"#!/bin/sh\necho x >> {calls}\n"
        f'if [ "$(wc -l < {calls})" -eq 1 ]; then echo "/usr/lib/unlucky/python3.11 3.11.2 9000"; '
        'else echo "/usr/lib/unlucky/python3.11 3.11.2 2200"; fi\n'
    )
    unlucky.chmod(0o755)
    done = bash(f"PYTHON_CANDIDATES=({steady} {unlucky}); pick_python", env={"PYTHON": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "/usr/lib/unlucky/python3.11"
    assert len(calls.read_text().splitlines()) == 3  # PYTHON_SPEED_ROUNDS
    assert "3.11.2 at /usr/lib/unlucky/python3.11: 2200 us" in done.stderr


def test_an_interpreter_less_than_a_tenth_faster_does_not_replace_the_one_found_first(tmp_path: Path) -> None:
    first = stub_python(tmp_path, "first", "/usr/lib/first/python3.12 3.12.1 3000")
    close = stub_python(tmp_path, "close", "/usr/lib/close/python3.11 3.11.2 2800")
    done = bash(f"PYTHON_CANDIDATES=({first} {close}); pick_python", env={"PYTHON": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "/usr/lib/first/python3.12"


def test_without_any_usable_interpreter_python3_is_kept(tmp_path: Path) -> None:
    broken = stub_python(tmp_path, "broken", "", status=1)
    done = bash(f"PYTHON_CANDIDATES=({broken}); pick_python", env={"PYTHON": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "python3"


def test_make_venv_makes_the_virtualenv_from_the_picked_interpreter(tmp_path: Path) -> None:
    candidates = [sys.executable, *(p for p in ("/usr/bin/python3",) if Path(p).exists())]
    venv = tmp_path / "venv"
    done = bash(f"PYTHON_CANDIDATES=({' '.join(candidates)}); make_venv {venv}", env={"PYTHON": ""})
    assert done.returncode == 0, done.stderr
    picked = done.stderr.split(" from ")[-1].strip()
    made_from = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import os, sys; print(os.path.realpath(sys._base_executable))"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    assert made_from == os.path.realpath(picked)
    reported = [line.split(" at ")[1].split(":")[0] for line in done.stderr.splitlines() if "found Python" in line]
    assert picked in reported
