"""Start, stop and restart one model server, for `POST /admin/models/{id}/{action}` and the CLI.

The fleet scripts stay the one way a server starts or stops (their checks, locks, the supervisor that
owns the processes, the log headers): an action runs them for that one id, with the gateway's
environment, and answers with what they printed. Whether an action makes sense now is decided from
the run directory, as the scripts see it, not from the gateway's last health check.
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

ACTIONS = ("start", "stop", "restart")
SCRIPT_TIMEOUT = 600.0  # a stop waits VLLM_STOP_TIMEOUT (60 s) per signal at most; a start a few seconds
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
    wanted = (supervisor_view(run_dir, model_id) or {}).get("state") in ("restarting", "failed")
    if action == "start" and running:
        return errors.conflict(f"`{model_id}` is already running: restart it instead.", "model_running")
    if action == "stop" and not running and not wanted:
        return errors.conflict(f"`{model_id}` is not running.", "model_not_running")
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


async def act(action: str, spec: BackendSpec | None, model_id: str, run_dir: Path) -> Outcome:
    """Do the action with the scripts; a GatewayError says why it was not done or failed."""
    refused = refusal(action, spec, model_id, run_dir)
    if refused is not None:
        raise refused
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
