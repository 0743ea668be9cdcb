"""Background health checks: each backend is polled and marked ready, loading or down.

A backend is ready when /health answers 200 and /v1/models lists its model. A server whose port is
still closed counts as loading while the fleet scripts' PID file shows its process alive (weights can
take minutes to load), and as down otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aiohttp
import orjson

from .model_config import ModelConfigError, load_backend_specs
from .registry import Backend, BackendState, Registry

log = logging.getLogger("vllm_gateway.health")

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3.0)


def fleet_process_alive(run_dir: Path, backend_id: str) -> bool:
    try:
        pid = int((run_dir / f"{backend_id}.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


async def probe(session: aiohttp.ClientSession, backend: Backend, run_dir: Path) -> tuple[BackendState, str]:
    headers = {"Authorization": f"Bearer {backend.spec.api_key}"} if backend.spec.api_key else {}
    try:
        async with session.get(f"{backend.base_url}/health", timeout=PROBE_TIMEOUT) as response:
            if response.status != 200:
                return BackendState.LOADING, f"/health answered {response.status}"
        async with session.get(f"{backend.base_url}/v1/models", headers=headers, timeout=PROBE_TIMEOUT) as response:
            if response.status != 200:
                return BackendState.LOADING, f"/v1/models answered {response.status}"
            listed = {model.get("id") for model in orjson.loads(await response.read()).get("data", [])}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError) as error:
        if fleet_process_alive(run_dir, backend.spec.id):
            return BackendState.LOADING, "process running, server not answering yet"
        return BackendState.DOWN, f"{type(error).__name__}: {error}".strip().rstrip(":")
    if backend.spec.name not in listed:
        return BackendState.LOADING, f"/v1/models does not list {backend.spec.name}"
    return BackendState.READY, "ok"


async def check_backend(session: aiohttp.ClientSession, backend: Backend, run_dir: Path) -> None:
    state, detail = await probe(session, backend, run_dir)
    if backend.mark(state, detail):
        log.info("backend %s (%s) is now %s: %s", backend.spec.id, backend.spec.name, state.value, detail)


class HealthChecker:
    """Polls every backend every `interval` seconds and reloads the model config when it changes."""

    def __init__(
        self, registry: Registry, session: aiohttp.ClientSession, interval: float, config_file: Path, run_dir: Path
    ) -> None:
        self.registry = registry
        self.session = session
        self.interval = interval
        self.config_file = config_file
        self.run_dir = run_dir
        self._config_stamp = self._stamp()
        self._wake = asyncio.Event()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.config_file.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def check_soon(self) -> None:
        """Ask for a round now, e.g. after a request found a backend unreachable."""
        self._wake.set()

    async def check_all(self) -> None:
        await asyncio.gather(*(check_backend(self.session, b, self.run_dir) for b in self.registry.backends()))

    async def reload_config_if_changed(self) -> None:
        stamp = self._stamp()
        if stamp == self._config_stamp:
            return
        self._config_stamp = stamp
        try:
            specs = await asyncio.to_thread(load_backend_specs, self.config_file)
        except ModelConfigError as error:
            log.error("model config changed but cannot be read, keeping the previous one: %s", error)
            return
        self.registry.replace(specs)
        log.info("model config reloaded: %s", ", ".join(self.registry.models) or "no models")

    async def run(self) -> None:
        while True:
            try:
                await self.reload_config_if_changed()
                await self.check_all()
            except Exception:  # a bug here must not stop health checks for good
                log.exception("health check round failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
