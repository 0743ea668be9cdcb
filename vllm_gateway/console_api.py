"""The console's data, for admin keys, each page's machine-readable twin: `GET /admin/overview` (every
model now, and its last hour and day), `GET /admin/models/{id}` (one model server: its config, health,
events, log and errors) and `GET /admin/requests` (the access log's recent request lines, filtered).

Each reads what the gateway has anyway: the registry and admission, the metrics' counters (through
console_figures.py's history), the access log, the fleet's events, its run directory and the config.
Files are read in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from . import errors
from .api import admin_key, gateway
from .backend_detail import bound_cpus, log_tail, shown_config
from .console_figures import Reading, gateway_reading
from .event_log import FLEET_EVENT_FILE, EventQuery, find_events
from .keystore import KeyRecord
from .registry import Backend, Model
from .request_log import RequestFilter, ServerErrors, find_requests, status_filter
from .settings import Settings
from .state import GatewayState

router = APIRouter()

DEFAULT_REQUESTS = 100
MAX_REQUESTS = 1000
SERVER_EVENTS = 50  # a model server's page: its last events, log lines and errors
SERVER_LOG_LINES = 100
SERVER_ERRORS = 50
QUANTILES = (0.5, 0.99)

Admin = Annotated[KeyRecord, Depends(admin_key)]
State = Annotated[GatewayState, Depends(gateway)]


async def reading_now(state: GatewayState) -> Reading:
    """The gateway's counters now, over every worker (their last snapshots), as /metrics adds them."""
    run_dir = state.settings.run_dir if state.settings.workers > 1 else None
    return await gateway_reading(state.metrics, run_dir)


def log_files(settings: Settings) -> list[Path]:
    """The request log and its newest rotated copy, which holds the lines just before a rotation."""
    return [settings.log_path, Path(f"{settings.log_path}.1")]


def server_keys(backend: Backend) -> list[str]:
    """The keys the server requires (its config's api_key, or the fleet's): masked wherever shown."""
    return [value.decode().removeprefix("Bearer ") for name, value in backend.auth if name == b"authorization"]


def server_entry(backend: Backend, in_flight: float, cpus: str) -> dict[str, Any]:
    spec = backend.spec
    return {
        "id": spec.id,
        "status": backend.state.value,
        "detail": backend.detail,
        "url": backend.base_url,
        "device": spec.device,
        "gpus": spec.gpus,
        "cpus": cpus,
        "in_flight": int(in_flight),
        "capacity": spec.capacity,
        "restarts": backend.restarts,
    }


# -- the overview --


@router.get("/admin/overview")
async def overview(state: State, _: Admin) -> dict[str, object]:
    """Every model: its state and servers, requests in flight and waiting, tokens per second now, TTFT
    over five minutes; requests and tokens per minute of each over the last hour and day."""
    models = list(state.registry.models.values())
    now = await reading_now(state)
    run_dir = state.settings.run_dir
    specs = [backend.spec for model in models for backend in model.backends]
    cpus = await asyncio.to_thread(lambda: {spec.id: bound_cpus(run_dir, spec) for spec in specs})
    history = state.figures
    entries = []
    for model in models:
        servers = [
            server_entry(backend, now.in_flight.get((model.name, backend.spec.id), 0.0), cpus[backend.spec.id])
            for backend in model.backends
        ]
        capacities = [backend.spec.capacity for backend in model.backends]
        p50, p99 = history.ttft_quantiles(now, model.name, QUANTILES)
        entries.append(
            {
                "model": model.name,
                "status": model.state.value,
                "in_flight": sum(server["in_flight"] for server in servers),
                "capacity": None if None in capacities else sum(c for c in capacities if c is not None),
                "waiting": state.admission.waiting_everywhere(model.name),
                "tokens_per_second": history.tokens_per_second(now, model.name),
                "ttft_p50_ms": p50,
                "ttft_p99_ms": p99,
                "backends": servers,
            }
        )
    return {
        "generated_at": round(now.at, 3),
        "models": entries,
        "per_minute": history.per_minute(now, [model.name for model in models]),
    }


# -- one model server --


@router.get("/admin/models/{model_id}")
async def model_server(model_id: str, state: State, _: Admin) -> dict[str, object]:
    """One server of the fleet by its id (as `POST /admin/models/{id}/{action}` takes it): its config line
    (secrets masked), health, its last events, the tail of its log and its model's recent errors."""
    backend = next((backend for backend in state.registry.backends() if backend.spec.id == model_id), None)
    if backend is None:
        raise errors.not_found(f"No model server with id `{model_id}` in the model config.")
    spec = backend.spec
    model = state.registry.models.get(spec.name)
    names = frozenset({spec.name, *(model.aliases if model is not None else ())})
    now = await reading_now(state)
    files = await asyncio.to_thread(server_files, state.settings, backend, names)
    server = server_entry(backend, now.in_flight.get((spec.name, spec.id), 0.0), files.pop("cpus"))
    return {
        "id": spec.id,
        "model": spec.name,
        "config": files.pop("config"),
        "status": server["status"],
        "detail": server["detail"],
        "restarts": server["restarts"],
        "in_flight": server["in_flight"],
        "capacity": server["capacity"],
        "device": server["device"],
        "gpus": server["gpus"],
        "cpus": server["cpus"],
        "url": server["url"],
        **files,  # events, log_tail, errors
    }


def server_files(settings: Settings, backend: Backend, names: frozenset[str]) -> dict[str, Any]:
    """What a server's page reads from files: its CPUs, config line, events, log tail and errors."""
    spec, secrets = backend.spec, server_keys(backend)
    if spec.api_key:
        secrets.append(spec.api_key)
    events = find_events(
        settings.fleet_log_dir / FLEET_EVENT_FILE, EventQuery(match=[(("model",), [spec.id])], limit=SERVER_EVENTS)
    )
    found, _ = find_requests(
        log_files(settings), ServerErrors(names, spec.id), SERVER_ERRORS, settings.console_request_scan_bytes
    )
    return {
        "cpus": bound_cpus(settings.run_dir, spec),
        "config": shown_config(spec, secrets),
        "events": events["data"],
        "log_tail": log_tail(spec, SERVER_LOG_LINES, settings.console_log_tail_bytes, secrets),
        "errors": found,
    }


# -- the request log --


@router.get("/admin/requests")
def recent_requests(request: Request, state: State, _: Admin) -> dict[str, object]:
    """The access log's newest request lines, newest first: `key` (an id or a name), `model` (a name
    or alias), `status` (`404`, or a class: `4xx`) and `limit` (1 to 1000, default 100)."""
    params = request.query_params
    limit = params.get("limit") or str(DEFAULT_REQUESTS)
    if not (limit.isascii() and limit.isdigit() and 1 <= int(limit) <= MAX_REQUESTS):
        raise errors.bad_request(f"limit must be a whole number from 1 to {MAX_REQUESTS}.", param="limit")
    status = (params.get("status") or "").lower() or None
    if status is not None and not status_filter(status):
        raise errors.bad_request("status must be a status code such as 404, or a class such as 5xx.", param="status")
    wanted = RequestFilter(
        key=params.get("key") or None, models=model_names(state, params.get("model") or None), status=status
    )
    settings = state.settings
    found, has_more = find_requests(log_files(settings), wanted, int(limit), settings.console_request_scan_bytes)
    return {"object": "list", "data": found, "has_more": has_more}


def model_names(state: GatewayState, name: str | None) -> frozenset[str]:
    """Every name a model goes by in the log (its name and aliases: lines name the model as the request
    did), or only `name` for a model the config no longer has."""
    if name is None:
        return frozenset()
    model: Model | None = state.registry.resolve(name)
    names: Sequence[str] = [model.name, *model.aliases] if model is not None else [name]
    return frozenset(names)
