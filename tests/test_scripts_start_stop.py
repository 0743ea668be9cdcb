"""start_all_models.sh / stop_all_models.sh / status_all_services.sh on real process trees.

The models are tests/support/fake_vllm_server.py: like vLLM, an API process with an engine and a
worker process below it, answering /health, so stopping has a whole tree to take down.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.fleet import FAKE_LAUNCH, Fleet, cpus_allowed, live
from tests.support.processes import REPO_ROOT, free_port, http_status, wait_until


@pytest.fixture
def fleet(tmp_path: Path):
    fleet = Fleet(tmp_path)
    (tmp_path / "m").mkdir()
    yield fleet
    fleet.stop_everything()


def fake_model(fleet: Fleet, name: str, port: int, extra: str = "") -> str:
    return f"vllm_model name={name} path={fleet.root}/m port={port} device=cpu launch_command='{FAKE_LAUNCH}' {extra}\n"


def info(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_fake/info", timeout=5) as response:
        return json.loads(response.read())


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return fleet.run("start_all_models.sh", *args)


def test_each_model_starts_in_its_own_process_group_and_answers_health(fleet: Fleet) -> None:
    ports = free_port(), free_port()
    fleet.write_config(fake_model(fleet, "a", ports[0]) + fake_model(fleet, "b", ports[1], "aliases=bee"))
    result = start(fleet, "--wait")
    assert result.returncode == 0, result.stderr
    assert "a is healthy after" in result.stderr and "b is healthy after" in result.stderr
    for name, port in zip("ab", ports, strict=True):
        pid = fleet.pid(name)
        assert http_status(f"http://127.0.0.1:{port}/health") == 200
        reported = info(port)
        assert reported["pids"][0] == pid  # the PID file names the API process itself
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[2]) == pid and int(stat[3]) == pid  # leader of its process group and session
        assert reported["argv"][:4] == ["--model", f"{fleet.root}/m", "--served-model-name", name]
        assert "VLLM_MODEL_CONFIG" not in reported["env"]
        assert reported["env"]["TOKENIZERS_PARALLELISM"] == "true"
    assert info(ports[1])["argv"][3:5] == ["b", "bee"]


def test_starting_a_running_model_again_starts_no_second_copy(fleet: Fleet) -> None:
    port = free_port()
    fleet.write_config(fake_model(fleet, "a", port))
    assert start(fleet, "--wait").returncode == 0
    pid = fleet.pid("a")
    again = start(fleet, "--wait")
    assert again.returncode == 0, again.stderr
    assert f"a is already running (PID {pid}, port {port}): not started again" in again.stderr
    assert fleet.pid("a") == pid
    assert fleet.log("a_vllm.log").count("starts a (vllm)") == 1
    assert not (fleet.log_dir / "a_vllm.log.1").exists()


def test_stop_takes_the_whole_process_tree_down_and_frees_the_port(fleet: Fleet) -> None:
    port = free_port()
    fleet.write_config(fake_model(fleet, "a", port))
    assert start(fleet, "--wait").returncode == 0
    tree = set(info(port)["pids"])
    assert len(live(tree)) == 3
    result = fleet.run("stop_all_models.sh")
    assert result.returncode == 0, result.stderr
    assert "a stopped" in result.stderr
    assert live(tree) == set()
    assert not port_open(port)
    assert fleet.pid_files() == []


def test_a_tree_that_ignores_sigterm_is_killed_after_the_timeout(fleet: Fleet) -> None:
    port = free_port()
    fleet.write_config(fake_model(fleet, "stubborn", port, "env=FAKE_VLLM_IGNORE_TERM=1"))
    assert start(fleet, "--wait").returncode == 0
    tree = set(info(port)["pids"])
    result = fleet.run("stop_all_models.sh", "--timeout", "1")
    assert result.returncode == 0, result.stderr
    assert "did not exit within 1s of SIGTERM: sending SIGKILL" in result.stderr
    assert live(tree) == set()
    assert not port_open(port)


def test_wait_while_polls_until_its_condition_fails_or_its_half_seconds_run_out() -> None:
    # The poll of stop (scripts/lib_processes.sh): every half second while the condition holds, at most
    # the half seconds given; it fails when they ran out, and WAITED says how many it slept.
    script = """
        set -euo pipefail
        source scripts/lib.sh
        calls=0
        holds_three_times() { calls=$((calls + 1)); ((calls <= 3)); }
        wait_while 10 holds_three_times && echo "ended: slept $WAITED, asked $calls"
        wait_while 2 true || echo "gave up: slept $WAITED"
        wait_while 0 false && echo "never held: slept $WAITED"
    """
    result = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ended: slept 3, asked 4", "gave up: slept 2", "never held: slept 0"]


def test_stop_leaves_an_unrelated_process_that_reused_the_pid_alone(fleet: Fleet) -> None:
    fleet.write_config(fake_model(fleet, "a", free_port()))
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        fleet.run_dir.mkdir()
        # the PID file of a model that died long ago, whose PID now belongs to someone else
        (fleet.run_dir / "a.pid").write_text(f"{bystander.pid} 12345 vllm\n")
        result = fleet.run("stop_all_models.sh")
        assert result.returncode == 0, result.stderr
        assert f"a is not running (removed stale PID file, PID {bystander.pid})" in result.stderr
        assert bystander.poll() is None
        assert fleet.pid_files() == []
    finally:
        bystander.kill()
        bystander.wait()


def test_start_replaces_a_stale_pid_file(fleet: Fleet) -> None:
    port = free_port()
    fleet.write_config(fake_model(fleet, "a", port))
    dead = subprocess.Popen(["true"])
    dead.wait()
    fleet.run_dir.mkdir()
    (fleet.run_dir / "a.pid").write_text(f"{dead.pid} 1 vllm\n")
    result = start(fleet, "--wait")
    assert result.returncode == 0, result.stderr
    assert f"a: removed a stale PID file (PID {dead.pid} is gone)" in result.stderr
    assert fleet.pid("a") == info(port)["pids"][0]


def test_a_model_dying_while_loading_is_reported_with_its_log(fleet: Fleet) -> None:
    good, bad = free_port(), free_port()
    fleet.write_config(fake_model(fleet, "good", good) + fake_model(fleet, "bad", bad, "env=FAKE_VLLM_FAIL_AFTER=2"))
    result = start(fleet, "--wait")
    assert result.returncode == 1
    assert "start_all_models: error: bad died while loading (the supervisor restarts it" in result.stderr
    assert "RuntimeError: simulated failure while loading weights" in result.stderr  # the log's tail
    assert "good is healthy after" in result.stderr
    # A load can fail for a passing reason (memory a dying server still held): it is tried again.
    wait_until(lambda: "supervisor restarts bad" in fleet.log("bad_vllm.log"), timeout=15)


def test_wait_shows_each_loading_models_state_and_time(fleet: Fleet) -> None:
    fleet.write_config(fake_model(fleet, "slow", free_port(), "env=FAKE_VLLM_LOAD_SECONDS=3"))
    result = start(fleet, "--wait")
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "slow loading (0m0" in line]
    assert progress, result.stderr
    assert "slow is healthy after 0m0" in result.stderr


def test_wait_gives_up_after_its_timeout(fleet: Fleet) -> None:
    fleet.write_config(fake_model(fleet, "slow", free_port(), "env=FAKE_VLLM_LOAD_SECONDS=60"))
    result = start(fleet, "--wait", "--timeout", "2")
    assert result.returncode == 1
    assert "error: not healthy after 2s: slow loading" in result.stderr
    assert fleet.pid("slow")  # still loading: left running for the user to decide


def test_a_command_that_fails_at_once_is_reported(fleet: Fleet) -> None:
    fleet.write_config(
        f"vllm_model name=a path={fleet.root}/m port={free_port()} device=cpu launch_command='no-such-vllm serve'\n"
    )
    result = start(fleet)
    assert result.returncode == 1
    assert "error: a exited at once; not restarted (fix it, then start it again)" in result.stderr
    assert "no-such-vllm" in result.stderr and "No such file or directory" in result.stderr
    assert fleet.model_pid_files() == []
    # A command that cannot run is not retried: the supervisor fails it itself, whatever the restart's
    # delay, rather than leave it to the script's look a second later.
    assert "supervisor restarts" not in fleet.log("a_vllm.log")
    events = [(e["event"], e.get("detail", "")) for e in fleet.events("a")]
    assert [name for name, _ in events] == ["start", "exit", "failed", "stopped"], events
    assert "at once after its start; not restarted" in events[2][1]


def test_a_restart_keeps_the_previous_log(fleet: Fleet) -> None:
    fleet.write_config(fake_model(fleet, "a", free_port(), "log=alpha.log"))
    assert start(fleet, "--wait").returncode == 0
    first_pid = fleet.pid("a")
    assert fleet.run("stop_all_models.sh").returncode == 0
    assert start(fleet, "--wait").returncode == 0
    previous, current = fleet.log("alpha.log.1"), fleet.log("alpha.log")
    assert f"pids [{first_pid}," in previous
    assert f"pids [{fleet.pid('a')}," in current and str(first_pid) not in current
    assert current.startswith("==== ") and "starts a (vllm) ====" in current.splitlines()[0]


def test_models_are_chosen_by_id_or_name(fleet: Fleet) -> None:
    ports = free_port(), free_port(), free_port()
    fleet.write_config(
        fake_model(fleet, "a", ports[0]) + fake_model(fleet, "b", ports[1], "id=b1") + fake_model(fleet, "c", ports[2])
    )
    assert start(fleet, "b1", "c", "--wait").returncode == 0
    assert fleet.model_pid_files() == ["b1.pid", "c.pid"]
    assert fleet.run("stop_all_models.sh", "c").returncode == 0
    assert fleet.model_pid_files() == ["b1.pid"]
    unknown = start(fleet, "nope")
    assert unknown.returncode == 2
    assert "no model with id or name 'nope'" in unknown.stderr


def test_models_served_elsewhere_are_skipped(fleet: Fleet) -> None:
    fleet.write_config(fake_model(fleet, "a", free_port()) + "vllm_model name=far url=http://10.9.9.9:8000\n")
    result = start(fleet, "--wait")
    assert result.returncode == 0, result.stderr
    assert "far: served elsewhere (http://10.9.9.9:8000), skipped" in result.stderr
    assert fleet.model_pid_files() == ["a.pid"]


def test_the_interval_separates_two_launches(fleet: Fleet) -> None:
    fleet.write_config(fake_model(fleet, "a", free_port()) + fake_model(fleet, "b", free_port()))
    result = start(fleet, "--interval", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(" (")[0] for line in lines if "started" in line or "waiting" in line] == [
        "start_all_models: started a",
        "start_all_models: waiting 1s before the next model",
        "start_all_models: started b",
    ]


def test_real_numactl_binds_each_model_to_its_cpus(fleet: Fleet) -> None:
    ports = free_port(), free_port()
    fleet.write_config(fake_model(fleet, "one", ports[0], "cpus=1") + fake_model(fleet, "any", ports[1]))
    result = start(fleet, "--wait")
    assert result.returncode == 0, result.stderr
    leader, engine, worker = info(ports[0])["pids"]
    assert {cpus_allowed(pid) for pid in (leader, engine, worker)} == {"1"}
    assert info(ports[0])["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert info(ports[0])["env"]["OMP_NUM_THREADS"] == "1"
    online = Path("/sys/devices/system/cpu/online").read_text().strip()
    assert cpus_allowed(info(ports[1])["pids"][0]) == online


def test_status_reports_pid_port_health_binding_uptime_and_log(fleet: Fleet) -> None:
    port = free_port()
    fleet.write_config(fake_model(fleet, "a", port, "cpus=0") + fake_model(fleet, "down", free_port()))
    assert start(fleet, "a", "--wait").returncode == 0
    result = fleet.run("status_all_services.sh", env={"GATEWAY_PORT": str(free_port())})
    assert result.returncode == 1  # "down" and the gateway are not running
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["SERVICE", "STATE", "PID", "PORT", "HEALTH", "GPUS", "CPUS", "UPTIME", "RESTARTS", "LOG"]
    name, state, pid, shown_port, health, gpus, cpus, uptime, restarts, log = rows[1]
    assert (name, state, pid, shown_port, health, gpus, cpus, restarts) == (
        "a",
        "ready",  # the supervisor's state
        str(fleet.pid("a")),
        str(port),
        "ok",
        "none",
        "0",
        "0",
    )
    assert uptime.startswith("0m") and log == str(fleet.log_dir / "a_vllm.log")
    assert rows[2][:3] == ["down", "stopped", "-"]
    supervisor = int((fleet.run_dir / "supervisor.pid").read_text().split()[0])
    assert rows[3][:3] == ["supervisor", "running", str(supervisor)]
    assert rows[4][:2] == ["gateway", "stopped"]


def test_a_model_removed_from_the_config_while_running_is_still_shown_and_stopped(fleet: Fleet) -> None:
    port = free_port()
    fleet.write_config(fake_model(fleet, "old", port) + fake_model(fleet, "kept", free_port()))
    assert start(fleet, "--wait").returncode == 0
    tree = set(info(port)["pids"])
    fleet.write_config(fake_model(fleet, "kept", free_port()))
    status = fleet.run("status_all_services.sh")
    assert re.search(r"^old\s+ready\s+%d\s.*\(not in the config\)$" % fleet.pid("old"), status.stdout, re.M)
    result = fleet.run("stop_all_models.sh")
    assert result.returncode == 0, result.stderr
    assert "old (not in the config) stopped" in result.stderr
    assert live(tree) == set()


@pytest.mark.parametrize(
    "script",
    [
        "start_all_models.sh",
        "stop_all_models.sh",
        "start_api_server.sh",
        "stop_api_server.sh",
        "start_all_services.sh",
        "stop_all_services.sh",
        "status_all_services.sh",
        "scripts/print_model_config.sh",
    ],
)
def test_every_script_explains_itself_with_help(fleet: Fleet, script: str) -> None:
    result = fleet.run(script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: {script}")
    assert fleet.pid_files() == []
