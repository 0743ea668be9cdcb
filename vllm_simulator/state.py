"""The one object that changes while the simulator serves: the scheduler, sleep, counters, faults, the record.

create_app (app.py) makes it and stores it under STATE; handlers reach it as request.app[STATE].
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from aiohttp import web

from .config import SimulatorConfig
from .faults import Faults
from .scheduler import Scheduler
from .sleep import SleepMode

# Polling paths (health checkers poll /health and /v1/models) never overwrite "last_request", so a
# health checker cannot hide what a test sent.
_UNRECORDED_PATHS = frozenset({"/health", "/metrics", "/version", "/ping", "/v1/models"})


class SimulatorState:
    """Everything that changes while serving: queue, counters, faults, the request record."""

    def __init__(self, config: SimulatorConfig, faults: Faults) -> None:
        self.config = config
        self.faults = faults
        self.created = int(time.time())
        # The engine's --max-num-seqs: generations hold a slot, the rest wait for one (or for a wake).
        self.scheduler = Scheduler(config.max_num_seqs)
        self.sleep = SleepMode(config, self.scheduler)
        # Counters, as /metrics and /_simulator/stats tell them.
        self.peak_running = 0  # the most running at once since the stats were last reset
        self.aborted = 0
        self.completed = 0
        self.crashed = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        # What clients sent, for tests to check through /_simulator/stats.
        self.requests: Counter[str] = Counter()
        self.last_request: dict[str, Any] | None = None
        self.last_by_path: dict[str, dict[str, Any]] = {}

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def waiting(self) -> int:
        return self.scheduler.waiting

    @property
    def primary_name(self) -> str:
        return self.config.served_model_names[0]

    def record(self, request: web.Request) -> dict[str, Any]:
        """Count the request and keep its head; the body is added once a handler has read it."""
        self.requests[request.path] += 1
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            key = key.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        entry = {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "headers": headers,
            "body": None,
        }
        self.last_by_path[request.path] = entry
        if request.path not in _UNRECORDED_PATHS:
            self.last_request = entry
        return entry

    def reset_stats(self) -> None:
        self.requests.clear()
        self.aborted = self.completed = self.crashed = 0
        self.peak_running = self.running
        self.sleep.reset_stats()
        self.last_request = None
        self.last_by_path = {}


STATE = web.AppKey("state", SimulatorState)
