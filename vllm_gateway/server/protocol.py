"""The gateway's HTTP/1.1 server: one asyncio protocol per client connection, parsed by httptools.

Model-addressed POSTs go to the relay the application hands over (ServerHooks.relay), which writes
the response straight to the socket through an server.exchange.Exchange. Everything else (health, the
model list, admin) goes to the FastAPI application through asgi_bridge. uvicorn still runs the
process (sockets, workers, signals, lifespan, graceful shutdown); this class is the `http` protocol
it is given.

Why not uvicorn's own protocol and ASGI for the relay: per request, ASGI builds a scope and message
dicts, checks every header in Python and writes the head and the body separately. On one core the
relay did about 4,000 requests/s that way, with 0.32 ms added at one client, and 4,400-5,300 with
0.25-0.27 ms this way (docs: performance).

The connection defends itself as nginx does: a deadline for each request head, a longest pause in a
body, a longest time an answer may lie unread, bounded request lines and heads, a key checked before
any body is read, and reading paused while answers wait to be sent. And it closes as nginx does: an
answer after which the connection closes while the client is still sending is followed by a lingering
close (linger), so that the client reads it rather than a reset.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from ..errors import GatewayError
from .asgi_bridge import serve_asgi
from .exchange import Exchange, error_response
from .flow import FlowControl
from .hooks import ServerHooks, find_hooks
from .reader import RequestReader
from .timers import ConnectionTimers


class GatewayProtocol(asyncio.Protocol):
    """uvicorn's `http` protocol class: `http="vllm_gateway.server.protocol:GatewayProtocol"`.

    The connection's lifetime: it reads requests with its RequestReader (server/reader.py), answers them
    one after the other in their order, and keeps its FlowControl (server/flow.py) and its clocks
    (server/timers.py) told of what it waits for."""

    def __init__(
        self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.hooks: ServerHooks = find_hooks(self.app)
        self.limits = self.hooks.limits
        self.max_small_body = self.limits.max_small_body
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_running_loop()
        self.reader = RequestReader(self, self.limits, self.hooks.relay_paths)
        # -- per connection (the transport comes with connection_made) --
        self.transport: asyncio.Transport
        self.flow: FlowControl
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.scheme = "http"  # "https" on a TLS connection, for the application's URLs and cookies
        self.served = 0
        self.closing = False
        self.client_eof = False
        self.broken: GatewayError | None = None  # answered once the requests before it are
        self.discarded = 0  # bytes read and dropped since reading stopped (linger_bytes bounds them)
        self.active: Exchange | None = None  # the request being answered
        self.queued: deque[Exchange] = deque()
        self.timers = ConnectionTimers(self)

    @property
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        return self.server_state.default_headers  # type: ignore[no-any-return]

    # -- asyncio protocol --

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.flow = FlowControl(transport, self.loop)
        if not self.hooks.cap.admit(len(self.server_state.connections)):
            transport.abort()
            return
        self.server_state.connections.add(self)
        self.client = address(transport.get_extra_info("peername"))
        self.server = address(transport.get_extra_info("sockname"))
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.timers.watch_reading()

    def data_received(self, data: bytes) -> None:
        if self.flow.stop_reading:
            self.discarded += len(data)
            self.timers.dropped()
            if self.discarded > self.limits.linger_bytes:
                self.transport.abort()
            return
        self.reader.feed(data)
        self.timers.watch_reading()

    def eof_received(self) -> bool:
        self.client_eof = True
        self.flow.stop_reading = True
        parsing = self.reader.parsing
        if parsing is not None and not parsing.complete:
            self.reader.forget()
            parsing.gone()  # a request cut short can never be answered
        if not self.transport.can_write_eof():
            # TLS: the client's close_notify. The transport closes after this whatever it returns (it
            # has no half-close, and warns when asked to stay open): no answer not yet written gets out.
            return False
        if (self.active is None and not self.queued) or self.flow.discarding:
            self.transport.close()
            return True
        # What arrived complete is answered, then the connection closes (HTTP/1.1's half-close).
        self.timers.probe_closed_client()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self.timers.cancel()
        for exchange in (self.active, self.reader.parsing, *self.queued):
            if exchange is not None and not exchange.done:
                exchange.gone()
                # A relay stops at once, so the backend sees the disconnect and aborts the generation.
                # FastAPI handlers finish what they started (a key being written, say).
                if exchange.task is not None and exchange.relay:
                    exchange.task.cancel()
        self.queued.clear()
        self.flow.wake_writers()

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        self.timers.writing_paused()
        self._update_reading()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self.timers.writing_resumed()
        self._update_reading()
        self._next()

    # -- from the reader --

    def head_received(self, exchange: Exchange) -> None:
        self.timers.head_complete()
        exchange.rejected = self.hooks.check_head(exchange)
        if self.transport.is_closing():
            return
        if self.active is None and not self.queued and not self.flow.write_paused:
            self.begin(exchange)
        else:
            self.queued.append(exchange)
            self._update_reading()

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
        if exchange.relay:
            task = self.loop.create_task(self.hooks.relay(exchange))
        else:
            app = serve_asgi(
                self.app, exchange, self.server, self.client, self.scheme, self.app_state, self.hooks.log_rejection
            )
            task = self.loop.create_task(app)
        exchange.task = task
        self.server_state.tasks.add(task)
        task.add_done_callback(self.task_done)

    def task_done(self, task: asyncio.Task[None]) -> None:
        self.server_state.tasks.discard(task)
        exchange = self.active
        if exchange is not None and exchange.task is task and not exchange.done:
            exchange.handler_ended(task)

    def response_done(self, exchange: Exchange) -> None:
        if exchange is not self.active:
            return
        self.active = None
        self.server_state.total_requests += 1
        self.timers.answer_done()
        if not exchange.keep_alive or self.closing or self.transport.is_closing():
            if exchange.complete and self.reader.parsing is None and not self.queued:
                self.transport.close()  # nothing more was coming: Connection: close, or HTTP/1.0
            else:
                # Its body, or more requests, may still be arriving. The exchange stays active, so
                # that no request that arrives meanwhile is begun.
                self.active = exchange
                self.linger()
            return
        self.served += 1
        self._next()

    def _next(self) -> None:
        """After an answer, or once the client reads again: the next request, the error, or the end."""
        if self.active is not None or self.flow.write_paused or self.transport.is_closing():
            return
        if self.queued:
            self.begin(self.queued.popleft())
            self._update_reading()
        elif self.broken is not None:
            self.hooks.log_rejection(None, self.broken.status)
            self.transport.write(error_response(self.broken))
            self.broken = None
            self.linger()
        elif self.client_eof:
            self.transport.close()
        else:
            self.timers.watch_reading()

    def fail(self, error: GatewayError) -> None:
        """The client broke the protocol (or its limits): what it sent before is answered, then this
        error, and the connection closes. A request whose body was arriving gets the error itself."""
        if self.flow.discarding:
            return  # the connection's last answer is out: nothing more is answered (linger)
        self.flow.stop_reading = True
        self._update_reading()
        parsing = self.reader.forget()
        if parsing is not None and (parsing is self.active or parsing in self.queued):
            parsing.fail(error)
        elif self.broken is None:
            self.broken = error
        self._next()

    def linger(self) -> None:
        """Close after the connection's last answer, which is written, while the client may still be
        sending (its body, the rest of a head over the limits, more requests): closed with bytes
        unread, the socket would reset the connection, and a reset can destroy the answer before the
        client reads it. As nginx's lingering close: our side ends after the answer (FIN), and what the
        client still sends is read and dropped until it closes too, for at most the linger timeout
        and linger_bytes (data_received)."""
        if self.client_eof or self.closing or self.transport.is_closing():
            self.transport.close()
            return
        self.flow.discard_input()
        self.timers.linger()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # over TLS, close_notify comes once the client is quiet (timers)

    def _update_reading(self) -> None:
        if self.flow.update_reading(len(self.queued)):
            self.timers.watch_reading()

    # -- shutdown --

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close when idle, else after the response being written."""
        self.closing = True
        if self.flow.discarding:
            self.transport.close()
        elif self.active is None:
            self.close_idle()

    def close_idle(self) -> None:
        """Close a connection that has nothing left to send: idle between requests, or at shutdown.

        Over TLS, close() sends close_notify and then waits for the client's, for up to 30 s (uvloop's
        and asyncio's SSL shutdown timeout). A client idle in a connection pool reads nothing until it
        sends again, so the connection would hold its descriptor, and a graceful stop, that long. With
        nothing left to send, it ends once close_notify is written. (The TLS layer's count leaves out the
        TCP transport's buffer, which fills only once the socket's own, megabytes, is full.)"""
        self.transport.close()
        tls = not self.transport.can_write_eof()
        if tls and not self.flow.write_paused and not self.transport.get_write_buffer_size():
            self.transport.abort()


def address(value: object) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if isinstance(value, tuple) and len(value) >= 2 else None
