"""The gateway's HTTP/1.1 server: one asyncio protocol per client connection, parsed by httptools.

Model-addressed POSTs (proxy.PROXIED_PATHS) go to proxy.handle, which writes the response straight
to the socket through the Exchange below. Everything else (health, the model list, admin) goes to
the FastAPI application through a small ASGI bridge. uvicorn still runs the process (sockets,
workers, signals, lifespan, graceful shutdown); this class is the `http` protocol it is given.

Why not uvicorn's own protocol and ASGI for the relay: per request, ASGI builds a scope and message
dicts, checks every header in Python and writes the head and the body separately. On one core the
relay did about 4,000 requests/s that way, with 0.32 ms added at one client, and 4,400-5,300 with
0.25-0.27 ms this way (README, Performance).
"""

from __future__ import annotations

import asyncio
import http
import logging
import urllib.parse
from collections import deque

import httptools

from . import errors, proxy
from .request_body import ClientDisconnected
from .state import GatewayState

log = logging.getLogger("vllm_gateway")

REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Requests parsed ahead of the one being answered (pipelining): beyond this, stop reading.
MAX_QUEUED = 4


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))


class Exchange:
    """One request (its head at once, its body as it arrives) and the writer of its response."""

    __slots__ = (
        "protocol", "method", "path", "raw_path", "query_string", "headers", "http_version", "keep_alive",
        "expect_continue", "body_parts", "body_size", "body_limit", "too_large", "complete", "body_waiter",
        "task", "relay", "client_gone", "head_sent", "done", "chunked", "head_only",
    )

    def __init__(self, protocol: GatewayProtocol) -> None:
        self.protocol = protocol
        self.method = "GET"
        self.path = "/"
        self.raw_path = b"/"
        self.query_string = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http_version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.body_limit = protocol.max_body
        self.too_large = False
        self.complete = False
        self.body_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task | None = None
        self.relay = False
        self.client_gone = False
        self.head_sent = False
        self.done = False
        self.chunked = False
        self.head_only = False

    # -- the request --

    async def read_body(self) -> bytes:
        """The whole body; GatewayError 413 beyond the limit, ClientDisconnected if the client goes."""
        while not self.complete:
            if self.too_large:
                break
            if self.client_gone:
                raise ClientDisconnected
            if self.expect_continue:
                self.expect_continue = False
                self.protocol.write(CONTINUE)
            self.body_waiter = self.protocol.loop.create_future()
            try:
                await self.body_waiter
            finally:
                self.body_waiter = None
        if self.too_large:
            raise errors.body_too_large(self.body_limit)
        parts = self.body_parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def declared_too_large(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length":
                return value.isdigit() and int(value) > self.body_limit
        return False

    def _wake(self) -> None:
        if self.body_waiter is not None and not self.body_waiter.done():
            self.body_waiter.set_result(None)

    # -- the response --

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response in one write; adds content-length unless the headers carry it."""
        if not any(name == b"content-length" for name, _ in headers):
            headers = [*headers, (b"content-length", b"%d" % len(body))]
        if not self.complete and (self.too_large or self.declared_too_large()):
            self.keep_alive = False  # rather than read and drop the rest of a body that is too large
        self.protocol.write(self._head(status, headers) + (b"" if self.head_only else body))
        self._finish()

    def start(self, status: int, headers: list[tuple[bytes, bytes]], first: bytes = b"") -> None:
        """The head of a response whose body follows with write() and ends with end()."""
        if any(name == b"content-length" for name, _ in headers):
            self.chunked = False
        elif self.http_version == "1.1":
            self.chunked = True
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        else:
            self.keep_alive = False  # an HTTP/1.0 client reads to the end of the connection
        self.protocol.write(self._head(status, headers) + self._frame(first))

    def write(self, chunk: bytes) -> None:
        if chunk:
            self.protocol.write(self._frame(chunk))

    def end(self, last: bytes = b"") -> None:
        data = self._frame(last)
        self.protocol.write(data + b"0\r\n\r\n" if self.chunked else data)
        self._finish()

    def abort(self) -> None:
        """A response that cannot be completed: the client sees the connection drop."""
        self.keep_alive = False
        self._finish()

    @property
    def write_paused(self) -> bool:
        return self.protocol.write_paused

    async def drain(self) -> None:
        await self.protocol.drain()

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        self.head_sent = True
        if not self.keep_alive or self.protocol.closing:
            self.keep_alive = False
            headers = [*headers, (b"connection", b"close")]
        return b"".join([
            status_line(status),
            *[name + b": " + value + b"\r\n" for name, value in self.protocol.default_headers],
            *[name + b": " + value + b"\r\n" for name, value in headers],
            b"\r\n",
        ])

    def _frame(self, chunk: bytes) -> bytes:
        if not chunk or self.head_only:
            return b""
        return b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self._wake()
            self.protocol.response_done(self)


class GatewayProtocol(asyncio.Protocol):
    """uvicorn's `http` protocol class: `http="vllm_gateway.http_protocol:GatewayProtocol"`."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.state: GatewayState = find_gateway(self.app).state
        self.max_body = self.state.settings.max_body_bytes
        self.server_state = server_state
        self.app_state = app_state
        self.keep_alive_timeout = config.timeout_keep_alive
        self.loop = _loop or asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.url = b""
        self.parsing: Exchange | None = None   # the request whose bytes are arriving
        self.last: Exchange | None = None      # the newest request
        self.active: Exchange | None = None    # the request being answered
        self.queued: deque[Exchange] = deque()
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.closing = False
        self.keep_alive_timer: asyncio.TimerHandle | None = None

    @property
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        return self.server_state.default_headers

    # -- asyncio protocol --

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server_state.connections.add(self)
        self.client = address(transport.get_extra_info("peername"))
        self.server = address(transport.get_extra_info("sockname"))

    def data_received(self, data: bytes) -> None:
        if self.keep_alive_timer is not None:
            self.keep_alive_timer.cancel()
            self.keep_alive_timer = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrades are served (nothing here speaks WebSocket): the request is answered as a plain
            # one, and what follows it is not read.
            self.pause_reading()
            if self.parsing is not None:
                self.on_message_complete()
            if self.last is not None:
                self.last.keep_alive = False
        except httptools.HttpParserError as error:
            self.bad_request(f"Invalid HTTP request: {error}.")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        if self.keep_alive_timer is not None:
            self.keep_alive_timer.cancel()
        for exchange in (self.active, self.parsing, *self.queued):
            if exchange is not None and not exchange.done:
                exchange.client_gone = True
                exchange._wake()
                # A relay stops at once, so the backend sees the disconnect and aborts the generation.
                # FastAPI handlers finish what they started (a key being written, say).
                if exchange.task is not None and exchange.relay:
                    exchange.task.cancel()
        self.queued.clear()
        self._resume_writers()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_writers()

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self.url = b""
        self.parsing = self.last = Exchange(self)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.parsing.expect_continue = True
        self.parsing.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        parser = self.parser
        exchange.method = parser.get_method().decode("ascii")
        exchange.http_version = parser.get_http_version()
        exchange.keep_alive = parser.should_keep_alive()
        exchange.head_only = exchange.method == "HEAD"
        url = httptools.parse_url(self.url)
        exchange.raw_path = url.path
        path = url.path.decode("ascii")
        exchange.path = urllib.parse.unquote(path) if "%" in path else path
        exchange.query_string = url.query or b""
        if self.active is None:
            self.begin(exchange)
        else:
            self.queued.append(exchange)
            if len(self.queued) >= MAX_QUEUED:
                self.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange.too_large or exchange.done:
            return  # answered already (413, 401, ...): the rest of the body is read and dropped
        exchange.body_size += len(body)
        if exchange.body_size > exchange.body_limit:
            exchange.too_large = True
            exchange.body_parts = []
        else:
            exchange.body_parts.append(body)
        exchange._wake()

    def on_message_complete(self) -> None:
        exchange = self.parsing
        self.parsing = None
        exchange.complete = True
        exchange._wake()

    # -- answering --

    def begin(self, exchange: Exchange) -> None:
        self.active = exchange
        exchange.relay = exchange.method == "POST" and exchange.path in proxy.PROXIED_PATHS
        task = self.loop.create_task(proxy.handle(self.state, exchange) if exchange.relay else self.asgi(exchange))
        exchange.task = task
        self.server_state.tasks.add(task)
        task.add_done_callback(self.task_done)

    def task_done(self, task: asyncio.Task) -> None:
        self.server_state.tasks.discard(task)
        exchange = self.active
        if exchange is None or exchange.task is not task or exchange.done:
            return
        # A handler that ended without finishing its response (a bug): the client must not hang.
        if not task.cancelled() and task.exception() is not None:
            log.error("unhandled error in %s %s", exchange.method, exchange.path, exc_info=task.exception())
        if exchange.head_sent:
            exchange.abort()
        else:
            exchange.respond(500, [(b"content-type", b"application/json")], errors.GatewayError(
                500, "The gateway failed on this request; its log has the details.", "server_error").body())

    def response_done(self, exchange: Exchange) -> None:
        if exchange is not self.active:
            return
        self.active = None
        self.server_state.total_requests += 1
        transport = self.transport
        if not exchange.keep_alive or self.closing or transport.is_closing():
            transport.close()
            return
        if self.queued:
            self.begin(self.queued.popleft())
            if self.reading_paused and len(self.queued) < MAX_QUEUED:
                self.resume_reading()
        elif exchange.complete:
            self.keep_alive_timer = self.loop.call_later(self.keep_alive_timeout, self.close_idle)

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        while self.write_paused and not self.transport.is_closing():
            self.drain_waiter = self.loop.create_future()
            await self.drain_waiter

    def _resume_writers(self) -> None:
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def bad_request(self, message: str) -> None:
        if self.active is None:  # else the answer being written would be interleaved with this one
            body = errors.bad_request(message, code="invalid_http").body()
            self.write(b"".join([status_line(400), b"content-type: application/json\r\n",
                                 b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body]))
        self.transport.close()

    def close_idle(self) -> None:
        if self.active is None and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close when idle, else after the response being written."""
        self.closing = True
        if self.active is None:
            self.transport.close()

    # -- everything that is not a relay: FastAPI through ASGI --

    async def asgi(self, exchange: Exchange) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": exchange.http_version,
            "server": self.server,
            "client": self.client,
            "scheme": "http",
            "method": exchange.method,
            "root_path": "",
            "path": exchange.path,
            "raw_path": exchange.raw_path,
            "query_string": exchange.query_string,
            "headers": exchange.headers,
            "state": self.app_state.copy(),
        }
        body_sent = False
        response: dict = {}

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                try:
                    return {"type": "http.request", "body": await exchange.read_body(), "more_body": False}
                except ClientDisconnected:
                    return {"type": "http.disconnect"}
            while not exchange.client_gone and not exchange.done:
                exchange.body_waiter = self.loop.create_future()
                await exchange.body_waiter
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if exchange.done:
                return
            if message["type"] == "http.response.start":
                response.update(message)
                return
            body, more = message.get("body", b""), message.get("more_body", False)
            headers = list(response.get("headers", []))
            if not exchange.head_sent:
                if more:
                    exchange.start(response["status"], headers, body)
                else:
                    exchange.respond(response["status"], headers, body)
            elif more:
                exchange.write(body)
                await exchange.drain()
            else:
                exchange.end(body)

        await self.app(scope, receive, send)  # an error, or no complete response: task_done answers


def find_gateway(app):
    """The gateway's own ASGI app, under any middleware uvicorn wrapped it in."""
    while app is not None and not isinstance(getattr(app, "state", None), GatewayState):
        app = getattr(app, "app", None)
    if app is None:
        raise RuntimeError("the http protocol serves only the gateway's app (vllm_gateway.app.create_app)")
    return app


def address(value) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if isinstance(value, tuple) and len(value) >= 2 else None
