"""What the application hands the HTTP server (server/protocol.py): the relay, the check of each head,
the log of the server's own answers, and the limits, so the server imports none of the request path."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..errors import GatewayError
from .exchange import Exchange

log = logging.getLogger("vllm_gateway")

# At most one log line per this many seconds about connections refused at the cap.
CAP_REPORT_SECONDS = 10.0


@dataclass(frozen=True)
class Limits:
    """The connection's limits and timeouts, from the settings (their defaults are nginx's, or near)."""

    head_timeout: float
    body_timeout: float
    send_timeout: float
    keepalive_timeout: float
    max_request_line: int
    max_head_bytes: int
    max_headers: int
    max_body: int
    max_small_body: int
    linger_timeout: float
    linger_bytes: int


class ConnectionCap:
    """At most `limit` client connections per process and port, so that the process keeps file
    descriptors for its upstream connections, its log and its key file; new connections beyond it are
    closed at once. `setting` names the limit in the log."""

    def __init__(self, limit: int, setting: str = "GATEWAY_MAX_CONNECTIONS") -> None:
        self.limit = limit
        self.setting = setting
        self.refused = 0
        self.reported_at = float("-inf")

    def admit(self, open_now: int) -> bool:
        if open_now < self.limit:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self.reported_at >= CAP_REPORT_SECONDS:
            log.warning(
                "connection limit of %d reached (%s): closed %d new connection(s)",
                self.limit,
                self.setting,
                self.refused,
            )
            self.reported_at = now
            self.refused = 0
        return False


@dataclass(frozen=True)
class ServerHooks:
    """What the application hands the HTTP server, so the server needs none of the request path's modules."""

    relay_paths: frozenset[str]
    relay: Callable[[Exchange], Coroutine[Any, Any, None]]
    # When a head is complete: the error that refuses the request before its body, or None.
    check_head: Callable[[Exchange], GatewayError | None]
    # One access-log line for a request the connection itself answered (status, method, path or "-").
    log_rejection: Callable[[Exchange | None, int], None]
    limits: Limits
    cap: ConnectionCap


def find_hooks(app: Any) -> ServerHooks:
    """The gateway's hooks, from its ASGI app under any middleware uvicorn wrapped it in."""
    while app is not None and not isinstance(getattr(app, "hooks", None), ServerHooks):
        app = getattr(app, "app", None)
    if app is None:
        raise RuntimeError("the http protocol serves only the gateway's app (vllm_gateway.app.create_app)")
    hooks: ServerHooks = app.hooks
    return hooks
