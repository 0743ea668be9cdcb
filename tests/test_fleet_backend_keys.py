"""Backend keys: every model server the fleet starts requires a key of its own, which the gateway sends,
so no local user reaches a model without the gateway's keys, limits and usage; api_key=none opts out.
The key is never on a command line, in a log or in a launch record. Real scripts, supervisor, gateway
and simulated models."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.chat import chat_body
from tests.support.fleet import Fleet, two_simulated_models
from tests.support.processes import wait_until

CHAT = chat_body("alpha", max_tokens=2)


@pytest.fixture
def fleet(tmp_path: Path):
    fleet = two_simulated_models(tmp_path, "api_key=none")  # alpha: the fleet's key; beta: none
    yield fleet
    fleet.stop_everything()


def post(url: str, key: str | None, body: dict) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as refused:
        return refused.code


def server_pid(fleet: Fleet, model: str) -> int:
    """The model server's pid; 0 while it has none (between an exit and its restart)."""
    try:
        return int((fleet.run_dir / f"{model}.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def test_a_model_server_refuses_requests_that_skip_the_gateway(fleet: Fleet) -> None:
    gateway_port, admin_key = fleet.start_with_gateway()
    alpha = f"http://127.0.0.1:{fleet.ports[0]}/v1/chat/completions"
    beta = f"http://127.0.0.1:{fleet.ports[1]}/v1/chat/completions"
    backend_key = (fleet.run_dir / "alpha.api_key").read_text().strip()
    gateway = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"

    assert post(alpha, None, CHAT) == 401  # a local user without the key
    assert post(alpha, admin_key, CHAT) == 401  # the gateway's keys are not the server's
    assert post(alpha, backend_key, CHAT) == 200
    assert post(beta, None, {**CHAT, "model": "beta"}) == 200  # api_key=none: opted out
    assert post(gateway, admin_key, CHAT) == 200  # the gateway sends the server's key
    assert post(gateway, admin_key, {**CHAT, "model": "beta"}) == 200
    assert not (fleet.run_dir / "beta.api_key").exists()


def test_a_backend_key_is_in_its_file_and_the_servers_environment_only(fleet: Fleet) -> None:
    fleet.start_with_gateway()
    key_file = fleet.run_dir / "alpha.api_key"
    backend_key = key_file.read_text().strip()
    pid = server_pid(fleet, "alpha")
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    beta_environment = Path(f"/proc/{server_pid(fleet, 'beta')}/environ").read_bytes().split(b"\0")
    others = [path for path in (*fleet.run_dir.iterdir(), *fleet.log_dir.rglob("*")) if path.is_file()]

    assert key_file.stat().st_mode & 0o777 == 0o600
    assert f"VLLM_API_KEY={backend_key}".encode() in environment
    assert not any(word.startswith(b"VLLM_API_KEY=") for word in beta_environment)
    assert not any(backend_key.encode() in word for word in command_line)  # ps shows every user argv
    assert [path.name for path in others if backend_key.encode() in path.read_bytes()] == ["alpha.api_key"]


def test_a_model_restarted_by_the_supervisor_keeps_its_key_and_the_gateway_reaches_it(fleet: Fleet) -> None:
    gateway_port, admin_key = fleet.start_with_gateway()
    backend_key = (fleet.run_dir / "alpha.api_key").read_text().strip()
    first = server_pid(fleet, "alpha")
    os.killpg(first, signal.SIGKILL)
    wait_until(
        lambda: server_pid(fleet, "alpha") not in (0, first) and fleet.supervised_state("alpha") == "ready", timeout=30
    )
    gateway = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
    wait_until(lambda: post(gateway, admin_key, CHAT) == 200, timeout=15)

    assert (fleet.run_dir / "alpha.api_key").read_text().strip() == backend_key
    assert post(f"http://127.0.0.1:{fleet.ports[0]}/v1/chat/completions", None, CHAT) == 401


def test_a_configured_api_key_is_the_one_the_server_requires(tmp_path: Path) -> None:
    fleet = two_simulated_models(tmp_path, "api_key=sk-chosen-by-the-team")
    try:
        gateway_port, admin_key = fleet.start_with_gateway()
        beta = f"http://127.0.0.1:{fleet.ports[1]}/v1/chat/completions"
        body = {**CHAT, "model": "beta"}
        answers = (post(beta, None, body), post(beta, "sk-chosen-by-the-team", body))
        through = post(f"http://127.0.0.1:{gateway_port}/v1/chat/completions", admin_key, body)
    finally:
        fleet.stop_everything()

    assert answers == (401, 200)
    assert through == 200
