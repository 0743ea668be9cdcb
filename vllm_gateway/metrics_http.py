"""GET /metrics: who may scrape, the route on the gateway's port or a port of its own, and the
snapshot task that lets one worker answer for all (the figures: the metrics package)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from ipaddress import ip_address
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import errors, tls
from .access import authenticate, sends_key
from .errors import GatewayError
from .keystore import KeyStore
from .metrics import workers
from .metrics.exposition import exposition
from .server.exchange import Exchange
from .server.hooks import ConnectionCap, ServerHooks
from .server.listener import Listener
from .settings import Settings
from .state import GatewayState

log = logging.getLogger("vllm_gateway.metrics")

METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

router = APIRouter()


def allowed_client(settings: Settings, host: str | None) -> bool:
    if host is None:
        return False
    try:
        address = ip_address(host)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in settings.metrics_networks)


def check_access(
    settings: Settings, keys: KeyStore, host: str | None, authorization: bytes, query: bytes
) -> GatewayError | None:
    """None when this client may scrape: from an allowed network, or with an admin key. A key that is
    sent is checked wherever the client is (401 when it is wrong)."""
    allowed = allowed_client(settings, host)
    if sends_key(authorization, query):
        try:
            key = authenticate(keys, authorization, query)
        except GatewayError as error:
            return error
        return None if key.admin or allowed else errors.metrics_forbidden()
    return None if allowed else errors.metrics_forbidden()


def check_head(state: GatewayState, exchange: Exchange) -> GatewayError | None:
    """access.check_head's counterpart for /metrics on the gateway's port."""
    if state.settings.metrics_port is not None:
        return None  # answered 404 by the route: the metrics are on their own port
    return access_error(state, exchange)


def access_error(state: GatewayState, exchange: Exchange) -> GatewayError | None:
    """Why this scrape is refused before its body, or None."""
    client = exchange.connection.client
    error = check_access(
        state.settings,
        state.keys,
        client[0] if client else None,
        exchange.header(b"authorization"),
        exchange.query_string,
    )
    return exchange.declared_size_error() if error is None else error


async def scrape(state: GatewayState) -> bytes:
    figures = workers.figures_of(state.metrics)  # copied on the loop, where the figures change
    run_dir = state.settings.run_dir if state.settings.workers > 1 else None
    backends = workers.BackendFigures(state.registry)
    key_file_ok = state.keys.problem is None
    return await asyncio.to_thread(exposition, figures, backends, run_dir, key_file_ok)


@router.get(METRICS_PATH)
async def get_metrics(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    if not state.settings.metrics:
        raise errors.not_found("The metrics are off (GATEWAY_METRICS).")
    if state.settings.metrics_port is not None:
        raise errors.not_found(f"The metrics are on port {state.settings.metrics_port}.")
    return Response(await scrape(state), media_type=CONTENT_TYPE)


# -- a port of its own (GATEWAY_METRICS_PORT) --


def check_port_head(state: GatewayState, exchange: Exchange) -> GatewayError | None:
    """The metrics port answers GET /metrics, to whom may scrape, and refuses the rest on its head."""
    if exchange.path != METRICS_PATH:
        return errors.not_found("Only /metrics is answered on this port.")
    if exchange.method not in ("GET", "HEAD"):
        return errors.method_not_allowed()
    return access_error(state, exchange)


class MetricsPort:
    """The metrics port's ASGI app, served by the gateway's own HTTP front (server/listener.py): what
    reaches it is a scrape that check_port_head let through."""

    def __init__(self, state: GatewayState, hooks: ServerHooks) -> None:
        self.state = state
        self.hooks = hooks  # what the front finds (server.hooks.find_hooks)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await scrape(self.state)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", CONTENT_TYPE.encode())]}
        )
        await send({"type": "http.response.body", "body": body})


def port_hooks(state: GatewayState, hooks: ServerHooks) -> ServerHooks:
    """The gateway port's hooks (its limits and timeouts, its log of refusals) for the metrics port:
    no relay, its own head check, and a connection cap of its own, so that connections to it can
    neither use up the descriptors nor take the gateway port's room."""
    return dataclasses.replace(
        hooks,
        relay_paths=frozenset(),
        check_head=functools.partial(check_port_head, state),
        cap=ConnectionCap(state.settings.metrics_max_connections, "GATEWAY_METRICS_MAX_CONNECTIONS"),
    )


# -- the worker's background part --


async def write_snapshots(state: GatewayState) -> None:
    """Each worker's figures to run/metrics about once a second, for the worker answering a scrape."""
    run_dir = state.settings.run_dir
    while True:
        await asyncio.sleep(state.settings.metrics_snapshot_seconds)
        try:
            await asyncio.to_thread(workers.write_snapshot, run_dir, workers.figures_of(state.metrics))
        except OSError as error:
            log.warning("cannot write the metrics snapshot: %s", error)


class MetricsService:
    """What /metrics needs while the server runs: the snapshot task, and the server on its own port
    (with the gateway port's `hooks` made over by port_hooks)."""

    def __init__(self, state: GatewayState, hooks: ServerHooks) -> None:
        self.state = state
        self.hooks = hooks
        self.tasks: list[asyncio.Task[None]] = []
        self.listener: Listener | None = None

    async def start(self) -> None:
        settings = self.state.settings
        if not settings.metrics:
            return
        if settings.workers > 1:
            self.tasks.append(asyncio.create_task(write_snapshots(self.state)))
        if settings.metrics_port is not None:
            self.listener = Listener(MetricsPort(self.state, port_hooks(self.state, self.hooks)))
            # Every worker listens; any one answers for all. With the gateway port's TLS: a scrape may
            # carry an admin key (GATEWAY_METRICS_ALLOW).
            await self.listener.start(
                settings.host, settings.metrics_port, reuse_port=settings.workers > 1, ssl=tls.context_of(settings)
            )

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.listener is not None:
            await self.listener.stop()
        if self.state.settings.workers > 1:
            workers.remove_snapshot(self.state.settings.run_dir)
