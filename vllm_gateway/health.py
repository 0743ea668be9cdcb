"""Background health checks: each backend is polled and marked ready, loading or down.

A backend is ready when /health answers 200 and /v1/models lists its model. A server whose port is
still closed counts as loading while the fleet scripts' PID file shows its process alive (weights can
take minutes to load); otherwise as the fleet's supervisor says (restarting after a backoff, or
failed after a crash loop), else down. A server the supervisor put to sleep, stopped as idle or is
waking is in that state whatever its /health says (vLLM's /health answers while it sleeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import orjson

from .model_config import ModelConfigError, load_backend_specs
from .registry import DORMANT, Backend, BackendState, Registry, bearer
from .upstream import UpstreamError, UpstreamPool
from .wake_on_demand import WakeOnDemand

log = logging.getLogger("vllm_gateway.health")

WAKE_ROUND = 0.25  # seconds between rounds while a server wakes for waiting requests


def probe_pool(timeout: float, max_head_bytes: int) -> UpstreamPool:
    """Connections for health checks, apart from the relay's and with short timeouts."""
    return UpstreamPool(connect_timeout=timeout, read_timeout=timeout, max_head_bytes=max_head_bytes)


def fleet_process_alive(run_dir: Path, backend_id: str) -> bool:
    try:
        pid = int((run_dir / f"{backend_id}.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def supervisor_view(run_dir: Path, backend_id: str) -> dict[str, object] | None:
    """What the fleet's supervisor says of the server's current start: run/<id>.status.json, when it
    belongs to the start run/<id>.want asks for (the files of vllm_fleet/run_dir.py)."""
    try:
        want = (run_dir / f"{backend_id}.want").read_text().split()
        status = orjson.loads((run_dir / f"{backend_id}.status.json").read_bytes())
    except (OSError, ValueError):
        return None
    if want[:1] != ["run"] or not isinstance(status, dict) or status.get("token") != " ".join(want[1:]):
        return None
    return status


def learn_fleet_key(run_dir: Path, backend: Backend) -> None:
    """The key the fleet made for the server (run/<id>.api_key, vllm_fleet/run_dir.py), as it is
    now: made at the model's first start, it may come after the gateway's."""
    if not backend.spec.fleet_key:
        return
    try:
        key = (run_dir / f"{backend.spec.id}.api_key").read_text().strip()
    except OSError:
        key = ""
    backend.auth = bearer(key) if key else []


async def get(pool: UpstreamPool, backend: Backend, path: bytes) -> tuple[int, bytes]:
    response = await pool.request(b"GET", backend.base_url, path, backend.auth)
    try:
        return response.status, await response.read_all()
    finally:
        response.release()


async def probe(
    pool: UpstreamPool, backend: Backend, run_dir: Path, view: dict[str, object]
) -> tuple[BackendState, str, frozenset[str] | None]:
    """The backend's state, why, and the names its /v1/models lists (None when it listed none);
    `view` is what the supervisor says of it (supervisor_view, {} for nothing)."""
    supervised = view.get("state")
    if supervised in DORMANT:
        return BackendState(str(supervised)), str(view.get("reason", "")) or str(supervised), None
    try:
        status, _ = await get(pool, backend, b"/health")
        if status != 200:
            return BackendState.LOADING, f"/health answered {status}", None
        status, body = await get(pool, backend, b"/v1/models")
        if status != 200:
            return BackendState.LOADING, f"/v1/models answered {status}", None
        models = orjson.loads(body).get("data", [])
        listed = frozenset(name for model in models if isinstance(name := model.get("id"), str))
    except UpstreamError as error:
        if fleet_process_alive(run_dir, backend.spec.id):
            return BackendState.LOADING, "process running, server not answering yet", None
        if view.get("state") in (BackendState.RESTARTING, BackendState.FAILED):
            return BackendState(str(view["state"])), str(view.get("reason", "")), None
        return BackendState.DOWN, str(error), None
    except (ValueError, AttributeError, TypeError):
        return BackendState.LOADING, "/v1/models did not answer a model list", None
    if backend.spec.name not in listed:
        return BackendState.LOADING, f"/v1/models does not list {backend.spec.name}", listed
    return BackendState.READY, "ok", listed


async def check_backend(pool: UpstreamPool, backend: Backend, run_dir: Path) -> bool:
    """Probe and mark the backend; returns whether its state changed."""
    view = supervisor_view(run_dir, backend.spec.id) or {}
    learn_fleet_key(run_dir, backend)
    state, detail, listed = await probe(pool, backend, run_dir, view)
    if listed is not None:
        backend.served = listed
    if state is BackendState.READY:
        # The supervisor may have restarted the server while the probe waited (a busy host): a server
        # that answers now is counted with the restarts said now, not those of before its restart.
        view = supervisor_view(run_dir, backend.spec.id) or view
    restarts = view.get("restarts")
    backend.restarts = restarts if isinstance(restarts, int) else 0
    backend.wakes = wake_figures(view)
    if backend.mark(state, detail):
        log.info("backend %s (%s) is now %s: %s", backend.spec.id, backend.spec.name, state.value, detail)
        return True
    return False


def wake_figures(view: dict[str, object]) -> tuple[tuple[float, ...], tuple[float, ...], float, float] | None:
    """The supervisor's count of the server's wakes (vllm_fleet run_dir.ModelStatus), when it has one."""
    bounds, counts, seconds, wakes = (
        view.get(name) for name in ("wake_bounds", "wake_counts", "wake_seconds", "wakes")
    )
    if not (isinstance(bounds, list) and isinstance(counts, list) and len(counts) == len(bounds) + 1):
        return None
    if not all(isinstance(value, int | float) for value in (*bounds, *counts, seconds, wakes)):
        return None
    return tuple(map(float, bounds)), tuple(map(float, counts)), float(seconds), float(wakes)  # type: ignore[arg-type]


class HealthChecker:
    """Polls every backend every `interval` seconds and reloads the model config when it changes."""

    def __init__(
        self,
        registry: Registry,
        pool: UpstreamPool,
        interval: float,
        config_file: Path,
        run_dir: Path,
        wakes: WakeOnDemand | None = None,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.interval = interval
        self.config_file = config_file
        self.run_dir = run_dir
        self.wakes = wakes or WakeOnDemand(run_dir)
        self.wakes.asked = self.check_soon
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
        self.wakes.keep_awake(self.registry)
        changed = await asyncio.gather(*(self._check(backend) for backend in self.registry.backends()))
        if any(changed):
            self.registry.changed()  # waiting requests go to a backend that came up, or learn none is left

    async def _check(self, backend: Backend) -> bool:
        changed = await check_backend(self.pool, backend, self.run_dir)
        # With its state, before any request can go there: the names its server answers to now.
        model = self.registry.models.get(backend.spec.name)
        if model is not None:
            model.learn_served()
        return changed

    def went_dormant(self, backend: Backend) -> bool:
        """Whether the supervisor put the backend to sleep or stopped it as idle since the last round
        (a request found its port closed); if so it is marked so, and requests wait for it again."""
        if not backend.spec.idles:
            return False
        view = supervisor_view(self.run_dir, backend.spec.id) or {}
        state = view.get("state")
        if state not in DORMANT:
            return False
        if backend.mark(BackendState(str(state)), str(view.get("reason", "")) or str(state)):
            self.registry.changed()
        return True

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
        self.registry.changed()
        log.info("model config reloaded: %s", ", ".join(self.registry.models) or "no models")

    async def run(self) -> None:
        while True:
            try:
                await self.reload_config_if_changed()
                await self.check_all()
            except Exception:  # a bug here must not stop health checks for good
                log.exception("health check round failed")
            # Requests wait for a server coming back: they go within a quarter second of its ready.
            interval = min(self.interval, WAKE_ROUND) if self.wakes.waking(self.registry) else self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
