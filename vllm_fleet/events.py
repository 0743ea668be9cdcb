"""The fleet's event log: one JSON object a line in VLLM_LOG_DIR/fleet_events.jsonl.

Fields: time (UTC, ISO 8601 with milliseconds), event, model, and where they apply pid, exit_code,
signal, restarts, delay (seconds until a restart) and detail (words). Events: start, ready, exit,
restart, hang, failed, adopted, stopped.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

EVENT_FILE = "fleet_events.jsonl"


def exit_words(status: int | None) -> tuple[dict[str, Any], str]:
    """A wait status as event fields and words: ({"exit_code": 3}, "exit code 3"),
    ({"signal": "SIGKILL"}, "killed by SIGKILL"); None: the supervisor did not start it."""
    if status is None:
        return {}, "exited (status unknown: started before this supervisor)"
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return {"signal": name}, f"killed by {name}"
    code = os.waitstatus_to_exitcode(status)
    return {"exit_code": code}, f"exit code {code}"


class EventLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, event: str, model: str, **fields: Any) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        line = {"time": stamp, "event": event, "model": model, **{k: v for k, v in fields.items() if v is not None}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write of one line in append mode: lines of two writers never interleave.
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")
