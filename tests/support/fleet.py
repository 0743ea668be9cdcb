"""Running the fleet scripts (start_all_models.sh, ...) from tests, in a scratch directory.

    fleet = Fleet(tmp_path)                      # run/ and logs/ under tmp_path, never the repo's
    fleet.write_config('vllm_model name=a path=/x port=18001 ...')
    fleet.use_gpu_fixture("h200x2")             # fake nvidia-smi and lscpu printing real outputs
    result = fleet.run("start_all_models.sh", "--dry-run")
    fleet.stop_everything()                      # in teardown: whatever the PID files name

Real scripts, real processes and sockets; only `nvidia-smi` and `lscpu` are fakes that print
recorded outputs (tests/fixtures/nvidia-smi/), since this machine has no GPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.support.processes import REPO_ROOT, free_port, process_tree
from vllm_fleet.placement import PlacementError

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "nvidia-smi"
FAKE_SERVER = REPO_ROOT / "tests" / "support" / "fake_vllm_server.py"

FAKE_NVIDIA_SMI = """#!/bin/sh
# Prints the outputs recorded in $FAKE_SMI_DIR, as nvidia-smi would.
case "$1" in
    topo) cat "$FAKE_SMI_DIR/topo_m.txt" ;;
    --query-gpu=*) cat "$FAKE_SMI_DIR/query_gpu.csv" ;;
    *) cat "$FAKE_SMI_DIR/smi.txt" ;;
esac
"""

# host.txt holds `lscpu`, then `numactl -H` and sysfs after a line "----".
FAKE_LSCPU = """#!/bin/sh
sed '/^----$/,$d' "$FAKE_SMI_DIR/host.txt"
"""

FAKE_LAUNCH = f"{sys.executable} {FAKE_SERVER}"


def recorded_commands(name: str, *, nvidia_smi_fails: bool = False) -> Callable[[list[str]], str]:
    """For vllm_fleet.placement.survey: answers nvidia-smi and lscpu with fixture NAME's outputs."""
    directory = FIXTURES / name

    def run(argv: list[str]) -> str:
        if argv == ["lscpu"]:
            return (directory / "host.txt").read_text().split("\n----\n")[0]
        if nvidia_smi_fails:
            raise PlacementError("nvidia-smi failed (exit 9): NVIDIA-SMI has failed")
        if argv[1:] == ["topo", "-m"]:
            return (directory / "topo_m.txt").read_text()
        assert argv[1].startswith("--query-gpu="), argv
        return (directory / "query_gpu.csv").read_text()

    return run


class Fleet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_dir = root / "run"
        self.log_dir = root / "logs"
        self.config = root / "models.sh"
        self.bin_dir = root / "bin"
        self.ports: tuple[int, ...] = ()  # the models' ports, for fleets that keep them here
        self.env = {
            "VLLM_RUN_DIR": str(self.run_dir),
            "VLLM_LOG_DIR": str(self.log_dir),
            "VLLM_MODEL_CONFIG": str(self.config),
            "VLLM_START_INTERVAL": "0",
            "VLLM_STOP_TIMEOUT": "10",
            "VLLM_PROGRESS_INTERVAL": "1",
        }

    def write_config(self, text: str) -> Path:
        self.config.write_text(text)
        return self.config

    def use_gpu_fixture(self, name: str) -> None:
        """Put a fake nvidia-smi and lscpu printing tests/fixtures/nvidia-smi/NAME first on PATH."""
        self.bin_dir.mkdir(exist_ok=True)
        for tool, text in (("nvidia-smi", FAKE_NVIDIA_SMI), ("lscpu", FAKE_LSCPU)):
            path = self.bin_dir / tool
            path.write_text(text)
            path.chmod(0o755)
        self.env["FAKE_SMI_DIR"] = str(FIXTURES / name)
        self.env["PATH"] = f"{self.bin_dir}:{os.environ['PATH']}"

    def run(
        self, script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **self.env, **(env or {})}
        return subprocess.run(
            ["bash", str(REPO_ROOT / script), *args],
            env=full_env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def pid(self, model_id: str) -> int:
        return int((self.run_dir / f"{model_id}.pid").read_text().split()[0])

    def pid_files(self) -> list[Path]:
        return sorted(self.run_dir.glob("*.pid")) if self.run_dir.exists() else []

    def model_pid_files(self) -> list[str]:
        """The names of the model servers' PID files (not the supervisor's, nor the gateway's)."""
        return [path.name for path in self.pid_files() if path.name not in ("supervisor.pid", "api_server.pid")]

    def log(self, name: str) -> str:
        return (self.log_dir / name).read_text()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """vllm_api_server.py ARGS with the fleet's environment."""
        return subprocess.run(
            [sys.executable, str(REPO_ROOT / "vllm_api_server.py"), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def events(self, model: str | None = None) -> list[dict]:
        """The supervisor's event log (logs/fleet_events.jsonl), of one model or all."""
        path = self.log_dir / "fleet_events.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [event for event in map(json.loads, lines) if model is None or event["model"] == model]

    def supervised_state(self, model: str) -> str:
        """The state the supervisor last wrote for the model."""
        try:
            return str(json.loads((self.run_dir / f"{model}.status.json").read_text())["state"])
        except (OSError, ValueError, KeyError):
            return ""

    def start_with_gateway(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        """start_all_services.sh --simulate --wait ARGS: the gateway's port and the admin key it printed."""
        gateway_port = free_port()
        (self.root / "gateway.env").write_text("")
        self.env.update(
            {
                "GATEWAY_PORT": str(gateway_port),
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_KEY_FILE": str(self.root / "api_keys.json"),
                "GATEWAY_ENV_FILE": str(self.root / "gateway.env"),
                "GATEWAY_HEALTH_INTERVAL": "0.3",
                **(env or {}),
            }
        )
        started = self.run("start_all_services.sh", "--simulate", "--wait", *args)
        assert started.returncode == 0, started.stderr
        match = re.search(r"^\s+(sk-\S+)$", started.stdout, re.M)
        assert match is not None, started.stdout
        return gateway_port, match.group(1)

    def stop_everything(self) -> None:
        """Teardown: kill every process group a PID file names, whatever the scripts did; the
        supervisor first, so that it restarts none of the others."""
        files = self.pid_files()
        for pid_file in sorted(files, key=lambda path: path.name != "supervisor.pid"):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            for member in process_tree(pid) | {pid}:
                try:
                    os.kill(member, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            pid_file.unlink(missing_ok=True)


TWO_MODELS = """
vllm_model name=alpha path=/data/models/none-here port={p1} log=alpha.log
vllm_model name=beta path=/data/models/none-either port={p2} log=beta.log {beta_args}
"""

# The supervisor's settings made quick, for simulated models that load in a second.
QUICK_SUPERVISOR = {
    "VLLM_RESTART_DELAY": "0.5",
    "VLLM_HEALTH_CHECK_INTERVAL": "0.3",
    "VLLM_HANG_CHECKS": "2",
    "VLLM_STOP_TIMEOUT": "5",
}


def two_simulated_models(root: Path, beta_args: str = "") -> Fleet:
    """A fleet of two models, alpha and beta (with `beta_args` on its line), on free ports
    (`fleet.ports`), its supervisor quick."""
    fleet = Fleet(root)
    fleet.ports = free_port(), free_port()
    fleet.write_config(TWO_MODELS.format(p1=fleet.ports[0], p2=fleet.ports[1], beta_args=beta_args))
    fleet.env.update(QUICK_SUPERVISOR)
    return fleet


def live(pids: set[int] | list[int]) -> set[int]:
    """The pids that still run (zombies count as gone)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def gateway_get(port: int, key: str, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def gateway_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")
