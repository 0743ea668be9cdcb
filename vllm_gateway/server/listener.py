"""A port the gateway listens on itself, beside the one uvicorn serves (the metrics port,
GATEWAY_METRICS_PORT): served by the same HTTP front, http_protocol.GatewayProtocol, so that it has
the gateway port's head and body limits, timeouts and lingering close, and the connection cap its
hooks carry (http_config.ConnectionCap), one of its own.

GatewayProtocol reads uvicorn's Config (for the app) and ServerState (the connections, the tasks,
the default headers); ListenerConfig and ListenerState are what it reads of them here.
"""

from __future__ import annotations

import asyncio
import contextlib
from ssl import SSLContext
from typing import Any

from .protocol import GatewayProtocol

# How long stop() waits for answers in progress before the loop closes what is left.
STOP_SECONDS = 2.0


class ListenerConfig:
    """uvicorn's Config, as far as GatewayProtocol reads it: the app, loaded."""

    loaded = True

    def __init__(self, app: Any) -> None:
        self.loaded_app = app


class ListenerState:
    """uvicorn's ServerState, as far as GatewayProtocol uses it."""

    def __init__(self) -> None:
        self.connections: set[GatewayProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.default_headers: list[tuple[bytes, bytes]] = []
        self.total_requests = 0


class Listener:
    """`app` (an ASGI app with `hooks`, as server.hooks.find_hooks finds them) on a port of its own."""

    def __init__(self, app: Any) -> None:
        self.config = ListenerConfig(app)
        self.state = ListenerState()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, reuse_port: bool, ssl: SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: GatewayProtocol(self.config, self.state, {}, loop), host, port, reuse_port=reuse_port, ssl=ssl
        )

    async def stop(self) -> None:
        """No new connections; idle ones close now, the others once their answer is sent."""
        if self.server is None:
            return
        self.server.close()
        for connection in list(self.state.connections):
            connection.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), STOP_SECONDS)
