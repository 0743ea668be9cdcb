"""GET /metrics: who may scrape, the route on the gateway's port or a port of its own, and the
snapshot task that lets one worker answer for all (metrics.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from ipaddress import ip_address

from fastapi import APIRouter, Request
from fastapi.responses import Response

from . import errors, metrics
from .access import authenticate, sends_key
from .errors import GatewayError
from .http_exchange import Exchange
from .keystore import KeyStore
from .settings import Settings
from .state import GatewayState

log = logging.getLogger("vllm_gateway.metrics")

METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The separate port's limits: a scrape's head is a few hundred bytes.
MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0

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


def forbidden() -> GatewayError:
    return GatewayError(
        403,
        "Metrics are answered to the networks in GATEWAY_METRICS_ALLOW and to admin keys.",
        "permission_error",
        "metrics_forbidden",
    )


def check_access(
    settings: Settings, keys: KeyStore, host: str | None, authorization: bytes, query: bytes
) -> GatewayError | None:
    """None when this client may scrape: from an allowed network, or with an admin key. A key that is
    sent is checked wherever the client is (401 when it is wrong)."""
    allowed = allowed_client(settings, host)
    if authorization or b"api_key=" in query:
        try:
            key = authenticate(keys, authorization, query)
        except GatewayError as error:
            return error
        return None if key.admin or allowed else forbidden()
    return None if allowed else forbidden()


def check_head(state: GatewayState, exchange: Exchange) -> GatewayError | None:
    """access.check_head's counterpart for /metrics on the gateway's port."""
    if state.settings.metrics_port is not None:
        return None  # answered 404 by the route: the metrics are on their own port
    client = exchange.connection.client
    error = check_access(
        state.settings,
        state.keys,
        client[0] if client else None,
        exchange.header(b"authorization") if sends_key(exchange) else b"",
        exchange.query_string,
    )
    if error is None and exchange.declared_too_large():
        return errors.body_too_large(exchange.body_limit)
    return error


async def scrape(state: GatewayState) -> bytes:
    figures = state.metrics.figures()  # copied on the loop, where the figures change
    run_dir = state.settings.run_dir if state.settings.workers > 1 else None
    return await asyncio.to_thread(metrics.exposition, figures, state.metrics.backend_states(), run_dir)


@router.get(METRICS_PATH)
async def get_metrics(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    if not state.settings.metrics:
        raise errors.not_found("The metrics are off (GATEWAY_METRICS).")
    if state.settings.metrics_port is not None:
        raise errors.not_found(f"The metrics are on port {state.settings.metrics_port}.")
    return Response(await scrape(state), media_type=CONTENT_TYPE)


# -- a port of its own (GATEWAY_METRICS_PORT) --


def answer(status: int, reason: str, body: bytes, content_type: str, extra: bytes = b"") -> bytes:
    return (
        (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


def error_answer(error: GatewayError) -> bytes:
    reasons = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request"}
    extra = b"".join(name + b": " + value + b"\r\n" for name, value in error.headers)
    return answer(error.status, reasons.get(error.status, "Error"), error.body(), "application/json", extra)


async def serve_connection(state: GatewayState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request per connection: GET /metrics, answered and closed."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        path, _, query = target.partition("?")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else None
        if path != METRICS_PATH:
            data = error_answer(errors.not_found("Only /metrics is answered on this port."))
        elif method not in ("GET", "HEAD"):
            data = error_answer(GatewayError(405, "Method Not Allowed", "invalid_request_error", "method_not_allowed"))
        elif error := check_access(
            state.settings, state.keys, host, headers.get("authorization", "").encode("latin-1"), query.encode()
        ):
            data = error_answer(error)
        else:
            body = await scrape(state)
            data = answer(200, "OK", b"" if method == "HEAD" else body, CONTENT_TYPE)
        writer.write(data)
        await writer.drain()
    except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


# -- the worker's background part --


async def write_snapshots(state: GatewayState) -> None:
    """Each worker's figures to run/metrics about once a second, for the worker answering a scrape."""
    run_dir = state.settings.run_dir
    while True:
        await asyncio.sleep(state.settings.metrics_snapshot_seconds)
        try:
            await asyncio.to_thread(metrics.write_snapshot, run_dir, state.metrics.figures())
        except OSError as error:
            log.warning("cannot write the metrics snapshot: %s", error)


class MetricsService:
    """What /metrics needs while the server runs: the snapshot task, and the server on its own port."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.tasks: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        settings = self.state.settings
        if not settings.metrics:
            return
        if settings.workers > 1:
            self.tasks.append(asyncio.create_task(write_snapshots(self.state)))
        if settings.metrics_port is not None:
            self.server = await asyncio.start_server(
                lambda reader, writer: serve_connection(self.state, reader, writer),
                settings.host,
                settings.metrics_port,
                limit=MAX_HEAD,
                reuse_port=settings.workers > 1,  # every worker listens; any one answers for all
            )

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
        if self.state.settings.workers > 1:
            metrics.remove_snapshot(self.state.settings.run_dir)
