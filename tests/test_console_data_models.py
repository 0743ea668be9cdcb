"""GET /admin/models/{id} over the real fleet (scripts, supervisor, gateway; simulated models): a server's
config line with its key masked, where it runs, its events, the tail of its log with keys masked, its
model's recent errors, and its state through a kill: restarting, then ready again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from tests.support.chat import chat_body
from tests.support.fleet import Fleet, gateway_get, two_simulated_models
from tests.support.processes import wait_until

BETA_KEY = "beta-server-key-7f3a9c"  # not of the `sk-` shape: masked because it is the server's key
LEAKED = "sk-leaked0123456789abcdef"


@dataclass
class Console:
    fleet: Fleet
    port: int  # the gateway's
    key: str  # the admin key start_all_services.sh made

    def page(self, server: str) -> dict:
        return gateway_get(self.port, self.key, f"/admin/models/{server}")

    def chat(self, model: str) -> int:
        """A chat completion's status."""
        body = chat_body(model, max_tokens=2)
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as refused:
            return refused.code


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory):
    fleet = two_simulated_models(tmp_path_factory.mktemp("models"), f"api_key={BETA_KEY} cpus=0 max_num_seqs=4")
    fleet.env["VLLM_RESTART_DELAY"] = "3"  # a restarting state the gateway's health rounds cannot miss
    try:
        yield Console(fleet, *fleet.start_with_gateway())
    finally:
        fleet.stop_everything()


def test_a_server_page_has_its_config_with_the_key_masked_and_where_it_runs(console: Console) -> None:
    beta = console.page("beta")
    summary = (beta["id"], beta["model"], beta["status"], beta["capacity"], beta["in_flight"], beta["restarts"])
    assert summary == ("beta", "beta", "ready", 4, 0, 0)
    words = beta["config"].split()
    assert "name=beta" in words and "api_key=***" in words and "cpus=0" in words and "max_num_seqs=4" in words
    assert BETA_KEY not in json.dumps(beta)
    assert (beta["device"], beta["gpus"]) == ("gpu", "")
    # The CPUs of its start's numactl binding (its launch record): none where numactl is missing.
    launch = json.loads((console.fleet.run_dir / "beta.launch.json").read_text())
    assert ("--physcpubind=0" in launch["argv"]) == bool(shutil.which("numactl"))
    assert beta["cpus"] == ("0" if shutil.which("numactl") else "")
    assert console.page("alpha")["cpus"] == ""  # no cpus=: its GPUs' CPUs, none for a simulated model


def test_the_log_tail_is_the_servers_log_with_keys_masked(console: Console) -> None:
    log = console.fleet.log_dir / "beta.log"
    with log.open("a") as file:
        file.write(f"console test: a client sent {LEAKED} and the server's key {BETA_KEY}\n")
    tail = console.page("beta")["log_tail"]
    assert 0 < len(tail) <= 100
    assert tail[-1] == "console test: a client sent sk-*** and the server's key ***"
    lines = log.read_text().splitlines()
    assert tail == [line.replace(LEAKED, "sk-***").replace(BETA_KEY, "***") for line in lines][-len(tail) :]
    assert LEAKED not in json.dumps(console.page("alpha")["log_tail"])


def test_an_unknown_server_is_a_404_in_openais_shape(console: Console) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        console.page("no-such-server")
    error = json.loads(refused.value.read())["error"]
    assert refused.value.code == 404 and error["type"] == "invalid_request_error"
    assert "no-such-server" in error["message"]


def test_a_killed_server_shows_restarting_then_ready_with_its_events_and_errors(console: Console) -> None:
    killed = console.fleet.pid("beta")
    os.kill(killed, signal.SIGKILL)
    restarting = wait_until(lambda: (p := console.page("beta"))["status"] == "restarting" and p, timeout=15)
    assert restarting["detail"].startswith("killed by SIGKILL")
    assert console.chat("beta") == 503  # no ready server: one of the model's errors

    ready = wait_until(lambda: (p := console.page("beta"))["status"] == "ready" and p, timeout=30)
    assert ready["restarts"] == 1
    events = ready["events"]
    assert {event["model"] for event in events} == {"beta"}
    assert [event["time"] for event in events] == sorted(event["time"] for event in events)  # oldest first
    kinds = [event["event"] for event in events]
    assert kinds[0] == "start" and "ready" in kinds
    exit_at = kinds.index("exit")
    assert events[exit_at]["signal"] == "SIGKILL" and events[exit_at]["pid"] == killed
    assert kinds[exit_at + 1] == "restart"
    assert ready["errors"][0]["status"] == 503 and ready["errors"][0]["model"] == "beta"
    assert all(error["status"] >= 500 for error in ready["errors"])
    # The other server's page has none of it.
    alpha = console.page("alpha")
    assert {event["model"] for event in alpha["events"]} == {"alpha"} and alpha["errors"] == []
    assert (alpha["status"], alpha["restarts"], console.chat("alpha")) == ("ready", 0, 200)
