"""What the gateway tells the fleet's supervisor about servers that sleep or stop when idle.

The supervisor (vllm_fleet/supervisor.py) owns those servers: it puts one to sleep, or stops it,
once it has not been used for its idle_after, and wakes or starts it again when it is used after
that. It learns of each use from one file per server, run/<id>.used, whose time is the last use:
the gateway touches it when it sends the server a request (at most once a second: idle_after is
minutes), at each health round while requests are in flight (a long stream is a use all along), and
at once when a request finds the model dormant, which is what wakes it. Several workers share the
file, so any of them keeps a server awake or wakes it; only servers with idle= pay for any of this.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .registry import DORMANT, Backend, Model, Registry

log = logging.getLogger("vllm_gateway.wake_on_demand")

TELL_EVERY = 1.0  # seconds: uses closer together than this are told once


class WakeOnDemand:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._failing = False
        # Called when a request asks a server to wake: the health checker then looks often, from now.
        self.asked: Callable[[], None] = lambda: None

    def used(self, backend: Backend) -> None:
        """A request went to the backend (proxy.open_upstream): told at most once a second."""
        now = time.monotonic()
        if now - backend.use_told >= TELL_EVERY:
            backend.use_told = now
            self._touch(backend)

    def wake(self, model: Model) -> None:
        """A request waits for the model: its dormant servers are asked to come back."""
        first = False
        for backend in model.backends:
            if backend.spec.idles and backend.state in DORMANT:
                if not backend.wake_asked:
                    backend.wake_asked = time.monotonic()
                    first = True
                backend.use_told = time.monotonic()
                self._touch(backend)
        if first:
            self.asked()

    def keep_awake(self, registry: Registry) -> None:
        """Each health round: servers with requests in flight are in use. One the supervisor put to
        sleep just as a request went to it holds that request until it wakes: this wakes it."""
        for backend in registry.backends():
            if backend.spec.idles and backend.in_flight:
                if backend.state in DORMANT:
                    backend.use_told = time.monotonic()
                    self._touch(backend)
                else:
                    self.used(backend)

    def waking(self, registry: Registry) -> bool:
        """Whether a server is on its way back for a request (the health checker then looks often)."""
        return any(backend.state in DORMANT and backend.wake_asked for backend in registry.backends())

    def _touch(self, backend: Backend) -> None:
        try:
            (self.run_dir / f"{backend.spec.id}.used").touch()
        except OSError as error:
            if not self._failing:  # once, not at every request
                log.error(
                    "cannot tell the supervisor %s was used (%s): it may sleep while in use", backend.spec.id, error
                )
            self._failing = True
        else:
            self._failing = False
