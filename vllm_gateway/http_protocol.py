"""The gateway's HTTP/1.1 server: one asyncio protocol per client connection, parsed by httptools.

Model-addressed POSTs go to the relay the application hands over (ServerHooks.relay), which writes
the response straight to the socket through an http_exchange.Exchange. Everything else (health, the
model list, admin) goes to the FastAPI application through asgi_bridge. uvicorn still runs the
process (sockets, workers, signals, lifespan, graceful shutdown); this class is the `http` protocol
it is given.

Why not uvicorn's own protocol and ASGI for the relay: per request, ASGI builds a scope and message
dicts, checks every header in Python and writes the head and the body separately. On one core the
relay did about 4,000 requests/s that way, with 0.32 ms added at one client, and 4,400-5,300 with
0.25-0.27 ms this way (docs: performance).

The connection defends itself as nginx does: a deadline for each request head, a longest pause in a
body, a longest time an answer may lie unread, bounded request lines and heads, a key checked before
any body is read, and reading paused while answers wait to be sent.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections import deque
from typing import Any

import httptools

from . import errors
from .access_log import clean
from .asgi_bridge import serve_asgi
from .errors import GatewayError
from .http_config import ServerHooks, find_hooks
from .http_exchange import Exchange, error_response
from .http_timers import ConnectionTimers
from .request_body import ClientDisconnected

log = logging.getLogger("vllm_gateway")

# Requests parsed ahead of the one being answered (pipelining): beyond this, stop reading.
MAX_QUEUED = 4


class BadHead(Exception):
    """Raised from a parser callback: the head is over a limit (414, 431) or cannot be served (400)."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class GatewayProtocol(asyncio.Protocol):
    """uvicorn's `http` protocol class: `http="vllm_gateway.http_protocol:GatewayProtocol"`."""

    def __init__(
        self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.hooks: ServerHooks = find_hooks(self.app)
        self.limits = self.hooks.limits
        self.max_small_body = self.limits.max_small_body
        self.max_head_bytes = self.limits.max_head_bytes
        self.max_headers = self.limits.max_headers
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        # -- per connection (the transport comes with connection_made) --
        self.transport: asyncio.Transport
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.served = 0
        self.reading_paused = False
        self.stop_reading = False  # for good: the client broke the protocol, or sent EOF
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.closing = False
        self.client_eof = False
        self.broken: GatewayError | None = None  # answered once the requests before it are
        # -- per request --
        self.url = b""
        self.head_size = 0  # the target and the header lines so far
        self.head_fed = 0  # bytes given to the parser while the current head is unfinished
        self.head_began = False  # a head began during the current feed
        self.parsing: Exchange | None = None  # the request whose bytes are arriving
        self.resuming: Exchange | None = None  # see _refuse_upgrade
        self.active: Exchange | None = None  # the request being answered
        self.queued: deque[Exchange] = deque()
        self.timers = ConnectionTimers(self)

    @property
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        return self.server_state.default_headers  # type: ignore[no-any-return]

    # -- asyncio protocol --

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        if not self.hooks.cap.admit(len(self.server_state.connections)):
            transport.abort()
            return
        self.server_state.connections.add(self)
        self.client = address(transport.get_extra_info("peername"))
        self.server = address(transport.get_extra_info("sockname"))
        self.timers.watch_reading()

    def data_received(self, data: bytes) -> None:
        if self.stop_reading:
            return
        parsing = self.parsing
        step = self.limits.max_head_bytes
        if (parsing is None or not parsing.head_complete) and len(data) > step:
            # Fed in slices, so that an unfinished head never holds much more than its limit.
            view = memoryview(data)
            for start in range(0, len(data), step):
                if not self._feed(view[start : start + step]):
                    break
        else:
            self._feed(data)
        self.timers.watch_reading()

    def eof_received(self) -> bool:
        self.client_eof = True
        self.stop_reading = True
        parsing = self.parsing
        if parsing is not None and not parsing.complete:
            self.parsing = None
            parsing.gone()  # a request cut short can never be answered
        if self.active is None and not self.queued:
            self.transport.close()
            return True
        # What arrived complete is answered, then the connection closes (HTTP/1.1's half-close).
        self.timers.probe_closed_client()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self.timers.cancel()
        for exchange in (self.active, self.parsing, *self.queued):
            if exchange is not None and not exchange.done:
                exchange.gone()
                # A relay stops at once, so the backend sees the disconnect and aborts the generation.
                # FastAPI handlers finish what they started (a key being written, say).
                if exchange.task is not None and exchange.relay:
                    exchange.task.cancel()
        self.queued.clear()
        self._resume_writers()

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self.head_began = True
        if self.resuming is not None:
            self.parsing = self.resuming
            return
        self.url = b""
        self.head_size = 0
        self.parsing = Exchange(self)

    def on_url(self, url: bytes) -> None:
        if self.resuming is not None:
            return
        self.url += url
        self.head_size += len(url)
        # The request line is the method, the target and the version, with two spaces.
        if len(self.url) + len(self.parser.get_method()) + 10 > self.limits.max_request_line:
            raise BadHead(errors.request_line_too_long(self.limits.max_request_line))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resuming is not None:
            return
        exchange = self.parsing
        assert exchange is not None
        headers = exchange.headers
        # The head so far (the request line's target counted in on_url) and its lines: one test on
        # the hot path, the reason only when it fails.
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head_bytes or len(headers) >= self.max_headers:
            raise BadHead(self.head_too_large(len(headers) + 1))
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            exchange.expect_continue = True
        headers.append((name, value))

    def head_too_large(self, lines: int) -> GatewayError:
        if lines > self.max_headers:
            return errors.head_too_large(f"more than {self.max_headers} header lines")
        return errors.head_too_large(f"a head over {self.max_head_bytes} bytes")

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        if self.resuming is not None:
            self.resuming = None
            return  # the replayed head of a refused upgrade: this request is already under way
        parser = self.parser
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise BadHead(errors.bad_request("The request target is not a path.", code="invalid_http")) from None
        exchange.method = parser.get_method().decode("ascii")
        exchange.http_version = parser.get_http_version()
        exchange.keep_alive = parser.should_keep_alive()
        exchange.head_only = exchange.method == "HEAD"
        exchange.head_complete = True
        self.timers.head_complete()
        exchange.raw_path = url.path
        path = url.path.decode("ascii")
        exchange.path = urllib.parse.unquote(path) if "%" in path else path
        exchange.query_string = url.query or b""
        exchange.relay = exchange.method == "POST" and exchange.path in self.hooks.relay_paths
        if exchange.relay:
            exchange.body_limit = self.limits.max_body
        exchange.rejected = self.hooks.check_head(exchange)
        if self.transport.is_closing():
            return
        if self.active is None and not self.queued and not self.write_paused:
            self.begin(exchange)
        else:
            self.queued.append(exchange)
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        assert self.parsing is not None
        self.parsing.take_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.parsing = None
        exchange.body_complete()

    # -- feeding the parser --

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parse `data`; False when the client broke the protocol and nothing more is to be read."""
        self.head_began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            return self._refuse_upgrade(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, BadHead):
                self.fail(cause.error)
            else:  # a bug in a callback: the client must not hang
                log.error("error while parsing a request", exc_info=cause)
                self.fail(errors.bad_request("The request could not be parsed.", code="invalid_http"))
            return False
        except httptools.HttpParserError as error:
            self.fail(errors.bad_request(f"Invalid HTTP request: {error}.", code="invalid_http"))
            return False
        parsing = self.parsing
        if parsing is not None and not parsing.head_complete:
            # The parser keeps an unfinished header line itself: bound what it may have been given.
            self.head_fed = len(data) if self.head_began else self.head_fed + len(data)
            if self.head_fed > 2 * self.limits.max_head_bytes:
                self.fail(errors.head_too_large(f"a head over {self.limits.max_head_bytes} bytes"))
                return False
        return True

    def _refuse_upgrade(self, rest: bytes | memoryview) -> bool:
        """llhttp stops at a request that asks for an upgrade (`curl --http2` asks for h2c) and takes
        all that follows its head, the body included, as another protocol. Nothing here is upgraded,
        so the request is served as plain HTTP/1.1: a fresh parser reads on, and where the request has
        a body, a replayed head that frames the same body hands that body to the same request."""
        exchange = self.parsing if self.parsing is not None else self.last_begun()
        self.parser = httptools.HttpRequestParser(self)
        if exchange is not None:
            framing = [(n, v) for n, v in exchange.headers if n in (b"content-length", b"transfer-encoding")]
            if framing:
                exchange.complete = False  # llhttp ended the message at its head
                self.resuming = exchange
                replayed = b"".join([b"POST / HTTP/1.1\r\n", *[n + b": " + v + b"\r\n" for n, v in framing], b"\r\n"])
                if not self._feed(replayed):
                    return False
        return self._feed(rest) if len(rest) else True

    def last_begun(self) -> Exchange | None:
        return self.queued[-1] if self.queued else self.active

    # -- answering --

    def begin(self, exchange: Exchange) -> None:
        self.active = exchange
        if exchange.rejected is not None:
            self.hooks.log_rejection(exchange, exchange.rejected.status)
            exchange.respond_error(exchange.rejected)
            return
        if self.client_eof:
            self.timers.probe_closed_client()
        task = self.loop.create_task(self.hooks.relay(exchange) if exchange.relay else self.serve_app(exchange))
        exchange.task = task
        self.server_state.tasks.add(task)
        task.add_done_callback(self.task_done)

    async def serve_app(self, exchange: Exchange) -> None:
        try:
            body = await exchange.read_body()  # small (max_small_body), so the app is handed it whole
        except GatewayError as error:
            self.hooks.log_rejection(exchange, error.status)
            exchange.respond_error(error)
            return
        except ClientDisconnected:
            return
        await serve_asgi(self.app, exchange, body, self.server, self.client, self.app_state)

    def task_done(self, task: asyncio.Task[None]) -> None:
        self.server_state.tasks.discard(task)
        exchange = self.active
        if exchange is None or exchange.task is not task or exchange.done:
            return
        # A handler that ended without finishing its response (a bug): the client must not hang.
        if not task.cancelled() and task.exception() is not None:
            log.error("unhandled error in %s %s", exchange.method, clean(exchange.path), exc_info=task.exception())
        if exchange.head_sent or exchange.client_gone:
            exchange.abort()
        else:
            exchange.respond_error(
                GatewayError(500, "The gateway failed on this request; its log has the details.", "server_error")
            )

    def response_done(self, exchange: Exchange) -> None:
        if exchange is not self.active:
            return
        self.active = None
        self.server_state.total_requests += 1
        self.timers.answer_done()
        if not exchange.keep_alive or self.closing or self.transport.is_closing():
            self.transport.close()
            return
        self.served += 1
        self._next()

    def _next(self) -> None:
        """After an answer, or once the client reads again: the next request, the error, or the end."""
        if self.active is not None or self.write_paused or self.transport.is_closing():
            return
        if self.queued:
            self.begin(self.queued.popleft())
            self._update_reading()
        elif self.broken is not None:
            self.hooks.log_rejection(None, self.broken.status)
            self.transport.write(error_response(self.broken))
            self.transport.close()
        elif self.client_eof:
            self.transport.close()
        else:
            self.timers.watch_reading()

    def fail(self, error: GatewayError) -> None:
        """The client broke the protocol (or its limits): what it sent before is answered, then this
        error, and the connection closes. A request whose body was arriving gets the error itself."""
        self.stop_reading = True
        self._update_reading()
        parsing, self.parsing = self.parsing, None
        if parsing is not None and (parsing is self.active or parsing in self.queued):
            parsing.fail(error)
        elif self.broken is None:
            self.broken = error
        self._next()

    # -- flow control --

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.timers.writing_paused()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.timers.writing_resumed()
        self._resume_writers()
        self._update_reading()
        self._next()

    async def drain(self) -> None:
        while self.write_paused and not self.transport.is_closing():
            self.drain_waiter = self.loop.create_future()
            await self.drain_waiter

    def _resume_writers(self) -> None:
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def _update_reading(self) -> None:
        """Read while answers leave as fast as they are made and few requests wait (each answer could
        otherwise pile up in memory for a client that sends but never reads)."""
        pause = self.stop_reading or self.write_paused or len(self.queued) >= MAX_QUEUED
        if pause != self.reading_paused and not self.transport.is_closing():
            self.reading_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()
            self.timers.watch_reading()

    # -- shutdown --

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close when idle, else after the response being written."""
        self.closing = True
        if self.active is None:
            self.transport.close()


def address(value: object) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if isinstance(value, tuple) and len(value) >= 2 else None
