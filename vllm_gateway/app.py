"""Builds the gateway: its state, the FastAPI application for everything but the relay, and the
background tasks (health checks, key-file watching) that live as long as the server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from . import console_api, errors, metrics_http, proxy
from .access_log import key_label, setup_logging
from .api import router
from .console.routes import router as console_router
from .console_figures import keep_sampling
from .errors import GatewayError
from .health import HealthChecker, probe_pool
from .keystore import KeyFileError, KeyStore
from .model_config import load_backend_specs
from .ratelimit import RateLimiter
from .registry import Registry
from .server.file_limits import current_open_files_limit, default_max_connections
from .server.hooks import ConnectionCap, Limits, ServerHooks
from .settings import Settings, load_settings
from .state import GatewayState
from .upstream import UpstreamPool
from .usage_ledger import SQLiteUsageStore, UsageLedger
from .window_file import WindowFile

log = logging.getLogger("vllm_gateway")

KEY_FILE_POLL_SECONDS = 0.5


class Gateway:
    """The ASGI app behind everything but the relay (server/protocol.py sends model-addressed POSTs to
    proxy.handle, which `hooks` hands it): FastAPI, with a log line and an X-Request-ID for every request."""

    def __init__(self, state: GatewayState, api: FastAPI, hooks: ServerHooks) -> None:
        self.state = state
        self.api = api
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)  # lifespan: start-up and shutdown
        else:
            await self.logged(scope, receive, send)

    async def logged(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = proxy.new_request_id()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.api(scope, receive, send_with_id)
        finally:
            key_record = scope.get("state", {}).get("key")
            key = key_label(key_record.id, key_record.name) if key_record is not None else "-"
            self.state.log.request(
                request_id.decode(), scope["method"], scope["path"], status, time.perf_counter() - started, key
            )


def connection_limits(settings: Settings) -> Limits:
    """The HTTP server's limits and timeouts for each connection, from the settings."""
    return Limits(
        head_timeout=settings.head_timeout,
        body_timeout=settings.body_timeout,
        send_timeout=settings.send_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        max_request_line=settings.max_request_line_bytes,
        max_head_bytes=settings.max_head_bytes,
        max_headers=settings.max_headers,
        max_body=settings.max_body_bytes,
        max_small_body=settings.max_admin_body_bytes,
        linger_timeout=settings.linger_timeout,
        linger_bytes=settings.linger_bytes,
    )


def connection_cap(settings: Settings) -> ConnectionCap:
    # The metrics port's own connections (metrics_http.port_hooks) come out of the same descriptors.
    metrics_connections = settings.metrics_max_connections if settings.metrics_port is not None else 0
    max_connections = settings.max_connections or default_max_connections(
        current_open_files_limit() - metrics_connections, settings.concurrency_limit
    )
    return ConnectionCap(max_connections)


def build_state(settings: Settings) -> GatewayState:
    """Everything that can fail on bad configuration fails here, before the server listens."""
    keys = KeyStore(settings.key_file)
    keys.load()
    registry = Registry(load_backend_specs(settings.model_config_file))
    limiter = RateLimiter(
        settings.rate_limit_storage,
        local=not settings.shares_rate_limit_store,
        store_timeout=settings.redis_timeout,
    )
    ledger = (
        UsageLedger(SQLiteUsageStore(settings.usage_db_path), settings.usage_flush_seconds)
        if settings.usage_ledger
        else None
    )
    return GatewayState(settings=settings, registry=registry, keys=keys, limiter=limiter, ledger=ledger)


def kept_windows(settings: Settings, limiter: RateLimiter) -> WindowFile | None:
    """The file that keeps the windows counted in this process across restarts, their counts loaded
    from it; None when Redis counts them or the setting is off."""
    if limiter.local is None or not settings.limit_state:
        return None
    window_file = WindowFile(settings.limit_state_path, limiter.local)
    restored = window_file.load()
    if restored:
        log.info("%d rate-limit windows restored from %s", restored, window_file.path)
    return window_file


async def watch_key_file(state: GatewayState) -> None:
    """Picks up keys revoked or changed by other workers or the CLI within a second (a new key works
    at once: KeyStore.authenticate reads a changed file for a key it does not know). A broken key file
    is logged once for each change of it (KeyStore.problem, which /health and the metrics show too),
    and the keys' use is not written to it until it reads well again."""
    last_flush = time.monotonic()
    reported: str | None = None
    while True:
        await asyncio.sleep(KEY_FILE_POLL_SECONDS)
        try:
            if state.keys.refresh_if_changed():
                log.info("key file reloaded")
        except KeyFileError:
            pass  # state.keys.problem says why
        if state.keys.problem != reported:
            if state.keys.problem is not None:
                log.error("%s", state.keys.problem)
            reported = state.keys.problem
        if reported is not None:
            continue
        if time.monotonic() - last_flush > state.settings.key_usage_flush_seconds and state.keys.usage_due():
            last_flush = time.monotonic()
            try:
                await asyncio.to_thread(state.keys.flush_usage)
            except KeyFileError as error:  # broken since this round's look: the next round reports it
                log.warning("keys' last use not written: %s", error)


def create_app(settings: Settings | None = None) -> Gateway:
    settings = settings or load_settings()
    state = build_state(settings)
    state.log = setup_logging(settings)
    hooks = proxy.server_hooks(state, connection_limits(settings), connection_cap(settings))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.upstream = UpstreamPool(settings.connect_timeout, settings.read_timeout, settings.max_upstream_head_bytes)
        probes = probe_pool(settings.health_timeout, settings.max_upstream_head_bytes)
        state.health = HealthChecker(
            state.registry, probes, settings.health_interval, settings.model_config_file, settings.run_dir, state.wakes
        )
        await state.health.check_all()
        await state.admission.start()
        tasks = [asyncio.create_task(state.health.run()), asyncio.create_task(watch_key_file(state))]
        snapshots = settings.run_dir if settings.workers > 1 else None  # the other workers' figures
        sampling = keep_sampling(state.figures, state.metrics, snapshots, settings.console_sample_seconds)
        tasks.append(asyncio.create_task(sampling))
        window_file = kept_windows(settings, state.limiter)
        if window_file is not None:
            tasks.append(asyncio.create_task(window_file.keep(settings.limit_state_flush_seconds)))
        metrics_service = metrics_http.MetricsService(state, hooks)
        await metrics_service.start()
        if state.ledger is not None:
            state.ledger.start()
        log.info(
            "gateway listening on %s://%s:%s with models: %s (request path %s)",
            "https" if settings.tls_certfile is not None else "http",
            settings.host,
            settings.port,
            ", ".join(state.registry.models) or "none",
            # An extension module when vllm_api_server.py runs the compiled build (scripts/compile_gateway.py).
            "compiled" if str(proxy.__file__).endswith(".so") else "as Python",
        )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await metrics_service.stop()
            await state.admission.stop()
            with contextlib.suppress(KeyFileError, OSError):
                await asyncio.to_thread(state.keys.flush_usage)
            if state.ledger is not None:
                await state.ledger.stop()
            if window_file is not None:
                await window_file.save()
            state.upstream.close()
            state.body_parser.close()
            probes.close()
            state.log.stop()

    # No redirect for a trailing slash: Starlette builds its Location from the client's Host header.
    api = FastAPI(
        title="vLLM gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )
    api.state.gateway = state
    api.include_router(router)
    api.include_router(console_api.router)
    api.include_router(metrics_http.router)
    api.include_router(console_router)
    add_error_handlers(api)
    return Gateway(state, api, hooks)


def add_error_handlers(api: FastAPI) -> None:
    def respond(error: GatewayError) -> JSONResponse:
        return JSONResponse(
            error.body_dict(),
            status_code=error.status,
            headers={name.decode(): value.decode() for name, value in error.headers},
        )

    @api.exception_handler(GatewayError)
    async def gateway_error(_: Request, error: GatewayError) -> JSONResponse:
        return respond(error)

    @api.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:]) or None
        return respond(errors.bad_request(f"{where or 'body'}: {first['msg']}", param=where))

    @api.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            return respond(errors.not_found("No such endpoint. See the README for the gateway's endpoints."))
        return respond(errors.framework_error(error.status_code, str(error.detail)))
