"""The gateway's HTTP/1.1 server (vllm_gateway.server.protocol.GatewayProtocol) in the test's own process:
one asyncio loop, and an in-memory transport in place of a socket. Request bytes go in as a socket would
hand them over (data_received, eof_received, never while reading is paused); what the server writes, and
whether it closed, aborted, ended its side or paused reading, is read back. No process and no socket, so
a protocol test takes milliseconds: its clocks are the loop's real ones, with timeouts of milliseconds.

    with MemoryServer(limits_with(keepalive_timeout=0.05)) as server:  # echo_relay, plain_app, no key check
        client = server.connect()
        client.send(b"GET /health HTTP/1.1\\r\\nHost: gw\\r\\n\\r\\n")
        assert client.take() == b"HTTP/1.1 200 OK\\r\\ncontent-type: text/plain\\r\\n..."
        server.run(0.1)                                 # the loop runs 0.1 s: timers fire
        assert client.transport.closed                  # idle past the keep-alive timeout

What GatewayProtocol reads of uvicorn's Config and ServerState is what vllm_gateway.server.listener
gives it for the metrics port (ListenerConfig, ListenerState): the same stand-ins serve here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

from vllm_gateway.errors import GatewayError
from vllm_gateway.server.exchange import ClientDisconnected, Exchange
from vllm_gateway.server.hooks import ConnectionCap, Limits, ServerHooks
from vllm_gateway.server.listener import ListenerConfig, ListenerState
from vllm_gateway.server.protocol import GatewayProtocol
from vllm_gateway.settings import Settings

Relay = Callable[[Exchange], Coroutine[Any, Any, None]]
Check = Callable[[Exchange], GatewayError | None]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Asgi = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

RELAY_PATH = "/v1/chat/completions"
# How long any wait on the loop may take before the test fails rather than hang: a liveness bound.
LIVENESS = 5.0
# What one read of the socket hands the server at most: more arrives in several reads.
READ_SIZE = 65536


def limits_with(**changes: Any) -> Limits:
    """The connection's limits as the gateway's defaults set them (vllm_gateway.settings), with `changes`."""
    defaults = Settings.model_fields
    values: dict[str, Any] = {
        "head_timeout": defaults["head_timeout"].default,
        "body_timeout": defaults["body_timeout"].default,
        "send_timeout": defaults["send_timeout"].default,
        "keepalive_timeout": defaults["keepalive_timeout"].default,
        "max_request_line": defaults["max_request_line_bytes"].default,
        "max_head_bytes": defaults["max_head_bytes"].default,
        "max_headers": defaults["max_headers"].default,
        "max_body": defaults["max_body_bytes"].default,
        "max_small_body": defaults["max_admin_body_bytes"].default,
        "linger_timeout": defaults["linger_timeout"].default,
        "linger_bytes": defaults["linger_bytes"].default,
    }
    return dataclasses.replace(Limits(**values), **changes)


# -- what the test's server answers --


async def echo_relay(exchange: Exchange) -> None:
    """A relay that answers `relayed: ` and the request's body, or the error reading it raised (as the
    gateway's relay does, proxy.handle)."""
    try:
        body = await exchange.read_body()
    except GatewayError as error:
        exchange.respond_error(error)
        return
    except ClientDisconnected:
        return
    exchange.respond(200, [(b"content-type", b"text/plain")], b"relayed: " + body)


def stream_relay(events: Iterable[bytes]) -> Relay:
    """A relay that reads the body, then sends `events` as a stream of unknown length, one write each."""
    pieces = list(events)

    async def relay(exchange: Exchange) -> None:
        await exchange.read_body()
        exchange.start(200, [(b"content-type", b"text/event-stream")])
        for piece in pieces:
            await asyncio.sleep(0)  # one event per turn of the loop, as a backend's chunks come
            exchange.write(piece)
        exchange.end()

    return relay


async def plain_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The application behind everything that is not relayed: answers with the request's method and
    path (`GET /health`), so that an answer says which request it belongs to."""
    await receive()
    body = f"{scope['method']} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def declared_size_check(exchange: Exchange) -> GatewayError | None:
    """No key needed: only the server's own rule, a body declared over its limit is refused with its head."""
    return exchange.declared_size_error()


class Served(Protocol):
    """An ASGI app with the hooks GatewayProtocol finds on it (server.hooks.find_hooks)."""

    hooks: ServerHooks

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None: ...


class TestApp:
    """What GatewayProtocol serves: an ASGI app that carries the gateway's hooks (server.hooks.find_hooks)."""

    __test__ = False  # not a test class for pytest

    def __init__(self, hooks: ServerHooks, asgi: Asgi) -> None:
        self.hooks = hooks
        self.asgi = asgi

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)


# -- the transport --


class MemoryTransport(asyncio.Transport):
    """A client connection's socket, in memory: what the server writes is kept in `written`; what the
    client sends waits in `inbox` while the server does not read (pause_reading), as in a socket's
    buffers, and is handed over in reads of at most READ_SIZE bytes otherwise."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.written = bytearray()
        self.inbox = bytearray()
        self.client_eof = False  # the client ended its side: delivered once the inbox is read
        self.eof_delivered = False
        self.closed = False  # the server called close()
        self.aborted = False  # the server called abort()
        self.eof_written = False  # the server ended its side (write_eof)
        self.lost = False  # connection_lost was called
        self.reset = False  # the client went away (MemoryConnection.disconnect)
        self.reading_paused = False
        self.pauses = 0  # how many times the server paused reading
        self.buffered = 0  # what get_write_buffer_size reports: bytes the client has not read
        self.peername = ("127.0.0.1", 50000)
        self.sockname = ("127.0.0.1", 8000)

    # -- asyncio.Transport, as the server uses it --

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("write() after write_eof()")  # as asyncio's and uvloop's transports do
        if self.is_closing():
            return  # a closed transport drops writes
        self.written += data

    def is_closing(self) -> bool:
        return self.closed or self.aborted or self.reset

    def close(self) -> None:
        if not self.is_closing():
            self.closed = True
            self.loop.call_soon(self._lose)  # as asyncio's transports do, on the loop's next turn

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            self.loop.call_soon(self._lose)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        assert not self.reading_paused, "pause_reading() while paused"
        self.reading_paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        assert self.reading_paused, "resume_reading() while reading"
        self.reading_paused = False
        self.loop.call_soon(self.deliver)

    def is_reading(self) -> bool:
        return not self.reading_paused and not self.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # No "socket": the server's probe of a half-closed client then waits for its next write to tell.
        return {"peername": self.peername, "sockname": self.sockname}.get(name, default)

    # -- the client's side --

    def deliver(self) -> None:
        """Hand the server what the client sent, a read at a time, while it reads."""
        while self.inbox and not self.reading_paused and not self.is_closing():
            data = bytes(self.inbox[:READ_SIZE])
            del self.inbox[:READ_SIZE]
            self.protocol.data_received(data)
        ready = self.client_eof and not self.inbox and not self.reading_paused
        if ready and not self.eof_delivered and not self.is_closing():
            self.eof_delivered = True
            if not self.protocol.eof_received():
                self.close()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)


# -- the server and its connections --


class MemoryServer:
    """The gateway's HTTP server on a loop of its own, with the hooks a test gives it."""

    def __init__(
        self,
        limits: Limits | None = None,
        relay: Relay = echo_relay,
        check: Check = declared_size_check,
        app: Asgi = plain_app,
        relay_paths: Iterable[str] = (RELAY_PATH,),
        max_connections: int = 1000,
        served: Served | None = None,
    ) -> None:
        """`served`: an app that carries its own hooks (the gateway's, vllm_gateway.app.Gateway), served
        in place of `app` with the hooks made of the other arguments."""
        self.loop = asyncio.new_event_loop()
        self.rejections: list[tuple[str, str, int]] = []  # (method, path, status), as the access log gets them
        if served is None:
            hooks = ServerHooks(
                relay_paths=frozenset(relay_paths),
                relay=relay,
                check_head=check,
                log_rejection=self._log_rejection,
                limits=limits if limits is not None else limits_with(),
                cap=ConnectionCap(max_connections),
            )
            served = TestApp(hooks, app)
        self.hooks = served.hooks
        self.config = ListenerConfig(served)
        self.state = ListenerState()
        self.connections: list[MemoryConnection] = []

    def _log_rejection(self, exchange: Exchange | None, status: int) -> None:
        self.rejections.append((exchange.method if exchange else "-", exchange.path if exchange else "-", status))

    def connect(self) -> MemoryConnection:
        connection = MemoryConnection(self)
        self.connections.append(connection)
        return connection

    # -- the loop --

    def call(self, function: Callable[..., object], *args: object) -> None:
        """Run `function(*args)` inside the running loop, as the loop calls a protocol's methods (the
        gateway's code may ask for the running loop there), then settle. From a coroutine already on
        the loop (a test's async client), at once: the coroutine's next await lets the server go on."""
        if self.loop.is_running():
            function(*args)
            return

        async def inside() -> None:
            function(*args)

        self.loop.run_until_complete(inside())
        self.settle()

    def settle(self) -> None:
        """Let the loop run what is ready (tasks, callbacks), but no timer that is not yet due."""
        self.loop.run_until_complete(self._turns(50))

    @staticmethod
    async def _turns(count: int) -> None:
        for _ in range(count):
            await asyncio.sleep(0)

    def run(self, seconds: float) -> None:
        """Let the loop run for `seconds`: the connections' timers that fall due meanwhile fire."""
        self.loop.run_until_complete(asyncio.sleep(seconds))
        self.settle()

    def now(self) -> float:
        """The loop's clock, which the connections' timers run on."""
        return self.loop.time()

    def until(
        self, condition: Callable[[], object], timeout: float = LIVENESS, what: str = "", interval: float = 0.001
    ) -> float:
        """Run the loop until `condition` holds, and return the loop's time then. Fails after `timeout`:
        a liveness bound, so that a server that never does it fails the test rather than hang it.
        `interval`: how long the loop runs between two looks (longer for a look that asks a process)."""

        async def wait() -> float:
            deadline = self.loop.time() + timeout
            while not condition():
                if self.loop.time() > deadline:
                    raise AssertionError(f"not within {timeout} s: {what or condition}")
                await asyncio.sleep(interval)
            return self.loop.time()

        return self.loop.run_until_complete(wait())

    def close(self) -> None:
        for connection in self.connections:
            connection.transport.abort()
        self.settle()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def __enter__(self) -> MemoryServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class MemoryConnection:
    """One client connection to a MemoryServer: send bytes, read back what the server wrote."""

    def __init__(self, server: MemoryServer) -> None:
        self.server = server
        self.protocol = GatewayProtocol(server.config, server.state, {}, server.loop)
        self.transport = MemoryTransport(server.loop, self.protocol)
        server.call(self.protocol.connection_made, self.transport)
        self.read = 0  # how much of `written` take() has returned
        self.pending = b""  # taken, not yet read as a response (MemoryGateway.read_response)

    def send(self, data: bytes, eof: bool = False) -> None:
        """The client sends `data`, and with `eof` ends its side after it (shutdown(SHUT_WR)): the server
        reads it (unless it paused reading), then the loop settles."""
        assert not self.transport.client_eof, "the client already ended its side"
        self.transport.inbox += data
        self.transport.client_eof = eof
        self.server.call(self.transport.deliver)

    def send_eof(self) -> None:
        """The client ends its side: the server gets EOF after what was sent before."""
        self.send(b"", eof=True)

    def stop_reading(self, unread: int) -> None:
        """The client reads nothing: `unread` bytes wait in the socket's buffer, which is full (pause_writing)."""
        self.transport.buffered = unread
        self.server.call(self.protocol.pause_writing)

    def read_some(self, count: int) -> None:
        """The client reads `count` of the bytes waiting for it, not enough to take more (no resume_writing)."""
        self.transport.buffered = max(0, self.transport.buffered - count)

    def read_everything(self) -> None:
        """The client reads all that waits for it: the socket takes more (resume_writing)."""
        self.transport.buffered = 0
        self.server.call(self.protocol.resume_writing)

    def disconnect(self) -> None:
        """The client goes away altogether (a reset): the server loses the connection."""
        self.transport.reset = True
        self.transport.lost = True
        self.server.call(self.protocol.connection_lost, ConnectionResetError("reset by the client"))

    def take(self) -> bytes:
        """What the server wrote since the last take()."""
        data = bytes(self.transport.written[self.read :])
        self.read = len(self.transport.written)
        return data

    # -- what the server did with the connection --

    @property
    def gone(self) -> bool:
        """The server closed or aborted the connection."""
        return self.transport.is_closing()

    @property
    def ended(self) -> bool:
        """The server is done with the connection: it ended its side (a lingering close) or closed it."""
        return self.transport.eof_written or self.transport.is_closing()

    @property
    def kept_alive(self) -> bool:
        """Open both ways, reading: the server waits for the next request."""
        return not self.ended and not self.protocol.flow.stop_reading
