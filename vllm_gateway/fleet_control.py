"""Start, stop, restart, sleep and wake one model server, for `POST /admin/models/{id}/{action}` and
the CLI.

The fleet scripts stay the one way a server starts or stops (their checks, locks, the supervisor that
owns the processes, the log headers): those actions run them for that one id, with the gateway's
environment, and answer with what they printed. Sleep and wake are the supervisor's, as for an idle
model (vllm_fleet/supervisor.py): sleep leaves it a request file, wake tells it of a use, as a
request would (wake_on_demand.py); each answers once the supervisor has done it. Whether an action
makes sense now is decided from the run directory, as the scripts see it, not from the gateway's last
health check.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from . import errors
from .errors import GatewayError
from .health import fleet_process_alive, supervisor_view
from .model_config import BackendSpec
from .settings import REPO_DIR

ACTIONS = ("start", "stop", "restart", "sleep", "wake")
SCRIPT_TIMEOUT = 600.0  # a stop waits VLLM_STOP_TIMEOUT (60 s) per signal at most; a start a few seconds
SLEEP_TAKEN_WITHIN = 10.0  # the supervisor looks every half second: it has the request by then
WAKE_TIMEOUT = 600.0  # a wake after an idle stop loads the weights again: minutes for a large model
LOOK_EVERY = 0.2
LOCKED = "another start or stop of the models is running"  # lib.sh's lock message


@dataclass(frozen=True)
class Outcome:
    action: str
    id: str
    output: list[str]  # what the scripts printed, a line each


def refusal(action: str, spec: BackendSpec | None, model_id: str, run_dir: Path) -> GatewayError | None:
    """Why the action cannot be done now, or None."""
    if spec is None:
        return errors.not_found(f"No model server with id `{model_id}` in the model config.")
    if spec.remote:
        return errors.bad_request(
            f"`{model_id}` is served elsewhere ({spec.base_url}): the fleet scripts do not run it.", param="id"
        )
    running = fleet_process_alive(run_dir, model_id)
    supervised = str((supervisor_view(run_dir, model_id) or {}).get("state", ""))
    if action == "start" and running:
        return errors.conflict(f"`{model_id}` is already running: restart it instead.", "model_running")
    if action == "stop" and not running and supervised not in ("restarting", "failed", "stopped"):
        return errors.conflict(f"`{model_id}` is not running.", "model_not_running")
    if action == "sleep" and not spec.idles:
        return errors.conflict(
            f"`{model_id}` has idle=none in the model config: give it idle=sleep or idle=stop to let it sleep.",
            "idle_not_configured",
        )
    if action == "sleep" and supervised != "ready":
        return errors.conflict(
            f"`{model_id}` is {supervised or 'not running'}: only a ready model sleeps.", "model_not_ready"
        )
    if action == "wake" and supervised not in ("sleeping", "stopped", "waking"):
        return errors.conflict(f"`{model_id}` is {supervised or 'not running'}, not asleep.", "model_not_sleeping")
    return None


async def run_script(script: str, model_id: str) -> tuple[int, list[str]]:
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(REPO_DIR / script),
        model_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=REPO_DIR,
        env=dict(os.environ),
        start_new_session=True,  # the servers it starts belong to their own sessions, never to ours
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), SCRIPT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise errors.fleet_script_failed(f"{script} {model_id} took over {SCRIPT_TIMEOUT:g} s: stopped") from None
    return process.returncode or 0, output.decode(errors="replace").splitlines()


async def supervised_state(run_dir: Path, model_id: str, wanted: tuple[str, ...], timeout: float) -> str:
    """Wait until the supervisor says the model is in one of the `wanted` states; a GatewayError when
    it fails or restarts instead, or does nothing within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        view = supervisor_view(run_dir, model_id) or {}
        state = str(view.get("state", ""))
        if state in wanted:
            return state
        if state in ("restarting", "failed"):
            raise errors.fleet_action_failed(f"`{model_id}` is {state}: {view.get('reason') or 'see its log'}")
        if loop.time() >= deadline:
            raise errors.fleet_action_failed(
                f"`{model_id}` is still {state or 'not supervised'} after {timeout:g} s: is the supervisor running?"
            )
        await asyncio.sleep(LOOK_EVERY)


async def act(action: str, spec: BackendSpec | None, model_id: str, run_dir: Path) -> Outcome:
    """Do the action with the scripts; a GatewayError says why it was not done or failed."""
    refused = refusal(action, spec, model_id, run_dir)
    if refused is not None:
        raise refused
    if action == "sleep":
        (run_dir / f"{model_id}.sleep").write_text("")
        state = await supervised_state(run_dir, model_id, ("sleeping", "stopped"), SLEEP_TAKEN_WITHIN)
        return Outcome(action, model_id, [f"{model_id} is {state}"])
    if action == "wake":
        (run_dir / f"{model_id}.used").touch()
        state = await supervised_state(run_dir, model_id, ("ready",), WAKE_TIMEOUT)
        return Outcome(action, model_id, [f"{model_id} is {state}"])
    scripts = {"start": ["start_all_models.sh"], "stop": ["stop_all_models.sh"]}.get(
        action, ["stop_all_models.sh", "start_all_models.sh"]
    )
    output: list[str] = []
    for script in scripts:
        status, lines = await run_script(script, model_id)
        output += lines
        if status != 0:
            if any(LOCKED in line for line in lines):
                raise errors.conflict(f"{script} {model_id}: {LOCKED}; try again.", "fleet_busy")
            last = next((line for line in reversed(lines) if line.strip()), "no output")
            raise errors.fleet_script_failed(f"{script} {model_id} failed (exit {status}): {last}")
    return Outcome(action, model_id, output)
