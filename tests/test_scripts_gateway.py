"""start_api_server.sh / stop_api_server.sh: the real gateway in the background, started like a model."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from tests.support.fleet import Fleet, live
from tests.support.processes import REPO_ROOT, free_port, http_status, process_tree


@pytest.fixture
def fleet(tmp_path: Path):
    fleet = Fleet(tmp_path)
    fleet.write_config(f"vllm_model name=m path=/none port={free_port()} device=cpu\n")
    fleet.env_file = tmp_path / "gateway.env"
    fleet.env_file.write_text("")
    fleet.env.update(
        {
            "GATEWAY_PORT": str(free_port()),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_KEY_FILE": str(tmp_path / "api_keys.json"),
            "GATEWAY_ENV_FILE": str(fleet.env_file),
        }
    )
    yield fleet
    fleet.stop_everything()


def health_url(fleet: Fleet, port: int | None = None) -> str:
    return f"http://127.0.0.1:{port or fleet.env['GATEWAY_PORT']}/health"


def test_first_start_prints_the_admin_key_and_a_second_start_is_a_no_op(fleet: Fleet) -> None:
    first = fleet.run("start_api_server.sh", "--wait")
    assert first.returncode == 0, first.stderr
    assert "First start: created an admin API key" in first.stdout
    assert re.search(r"^\s+sk-\S+$", first.stdout, re.MULTILINE)
    assert http_status(health_url(fleet)) is not None
    pid = fleet.pid("api_server")

    second = fleet.run("start_api_server.sh", "--wait")
    assert second.returncode == 0, second.stderr
    assert "sk-" not in second.stdout  # the key exists: nothing new to show
    assert f"the gateway is already running (PID {pid}" in second.stderr
    assert fleet.pid("api_server") == pid


def test_stop_ends_the_gateways_process_group_and_frees_its_port(fleet: Fleet) -> None:
    assert fleet.run("start_api_server.sh", "--wait").returncode == 0
    tree = process_tree(fleet.pid("api_server"))
    result = fleet.run("stop_api_server.sh")
    assert result.returncode == 0, result.stderr
    assert "gateway stopped" in result.stderr
    assert live(tree) == set()
    assert http_status(health_url(fleet)) is None
    assert fleet.pid_files() == []
    assert "gateway is not running" in fleet.run("stop_api_server.sh").stderr


def test_settings_come_from_the_env_file_with_set_a(fleet: Fleet) -> None:
    port = free_port()
    fleet.env_file.write_text(f"GATEWAY_PORT={port}\nGATEWAY_RATE_LIMIT=5/minute\n")
    del fleet.env["GATEWAY_PORT"]
    result = fleet.run("start_api_server.sh", "--wait")
    assert result.returncode == 0, result.stderr
    assert f"port {port}" in result.stderr
    assert http_status(health_url(fleet, port)) is not None
    assert fleet.run("stop_api_server.sh").returncode == 0


def test_a_missing_env_file_named_explicitly_is_an_error(fleet: Fleet, tmp_path: Path) -> None:
    result = fleet.run("start_api_server.sh", env={"GATEWAY_ENV_FILE": str(tmp_path / "absent.env")})
    assert result.returncode == 2
    assert "absent.env does not exist" in result.stderr
    assert fleet.pid_files() == []


def test_a_taken_port_stops_the_start_before_keys_init(fleet: Fleet, tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", int(fleet.env["GATEWAY_PORT"])))
        listener.listen()
        result = fleet.run("start_api_server.sh")
    assert result.returncode == 2
    assert f"port {fleet.env['GATEWAY_PORT']} is already in use" in result.stderr
    assert not (tmp_path / "api_keys.json").exists()


def test_dry_run_prints_keys_init_and_the_background_command(fleet: Fleet, tmp_path: Path) -> None:
    result = fleet.run("start_api_server.sh", "--dry-run", env={"GATEWAY_PYTHON": "/opt/py/bin/python"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"cd {REPO_ROOT}"
    assert f"export GATEWAY_PORT={fleet.env['GATEWAY_PORT']}" in lines
    assert "/opt/py/bin/python vllm_api_server.py keys init" in lines
    assert "setsid /opt/py/bin/python vllm_api_server.py serve \\" in lines
    assert lines[-1] == f"  >> {fleet.log_dir}/api_server.stdout.log 2>&1 < /dev/null &"
    assert fleet.pid_files() == [] and not (tmp_path / "api_keys.json").exists()
