"""One request and its response on a client connection: the request's head at once, its body as it
arrives, and the writer of the answer (whole, or a head and then pieces).

The connection (http_protocol.GatewayProtocol, through http_reader.RequestReader) feeds it and is
told when the response is done; the relay (proxy.py) and the ASGI bridge (server/asgi_bridge.py) read from it
and answer through it. What it needs of the connection is the Connection protocol below, and the
connection's flow control (http_flow.FlowControl) for its writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import ClassVar, Final, Protocol

from .. import errors
from ..access_log import clean
from ..errors import REASONS, GatewayError
from ..keystore import KeyRecord
from .flow import FlowControl

log = logging.getLogger("vllm_gateway")

Headers = list[tuple[bytes, bytes]]
HeaderItems = Sequence[tuple[bytes, bytes]]

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))


class ClientDisconnected(Exception):
    """The client went away before its request was complete."""


class _Rendered:
    """The server's default headers (date, server) as bytes: uvicorn replaces the list once a second,
    and every answer in between sends the same bytes, rendered once instead of per answer."""

    source: ClassVar[object] = None
    text: ClassVar[bytes] = b""


def rendered(headers: HeaderItems) -> bytes:
    if headers is not _Rendered.source:
        _Rendered.text = b"".join([name + b": " + value + b"\r\n" for name, value in headers])
        _Rendered.source = headers
    return _Rendered.text


def error_response(error: GatewayError, headers: HeaderItems = ()) -> bytes:
    """A whole error answer after which the connection closes: for the connection's own rejections."""
    body = error.body()
    return b"".join(
        [
            status_line(error.status),
            *[name + b": " + value + b"\r\n" for name, value in (*headers, *error.headers)],
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body),
            body,
        ]
    )


class Connection(Protocol):
    """What an exchange needs of its client connection (http_protocol.GatewayProtocol)."""

    loop: asyncio.AbstractEventLoop
    flow: FlowControl
    client: tuple[str, int] | None
    closing: bool  # shutting down: this answer is the connection's last
    max_small_body: int  # the body limit of a request that is not relayed

    @property
    def default_headers(self) -> Headers: ...
    def response_done(self, exchange: Exchange) -> None: ...


class Exchange:
    """One request (its head at once, its body as it arrives) and the writer of its response."""

    __slots__ = (
        "connection",
        "flow",
        "method",
        "path",
        "raw_path",
        "query_string",
        "headers",
        "header_map",
        "http_version",
        "keep_alive",
        "expect_continue",
        "body_parts",
        "body_size",
        "body_limit",
        "too_large",
        "complete",
        "body_waiter",
        "task",
        "relay",
        "client_gone",
        "head_sent",
        "done",
        "chunked",
        "head_only",
        "key",
        "rejected",
        "head_complete",
        "failure",
    )

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.flow = connection.flow
        # -- the request head --
        self.method = "GET"
        self.path = "/"
        self.raw_path = b"/"
        self.query_string = b""
        self.headers: Headers = []
        self.header_map: dict[bytes, bytes] | None = None  # header()'s, made at its first call
        self.http_version = "1.1"
        self.keep_alive = True
        self.expect_continue = False
        self.head_complete = False
        # Set when the head is complete: the caller's key, or why the request is refused unread.
        self.key: KeyRecord | None = None
        self.rejected: GatewayError | None = None
        self.relay = False
        # -- the request body --
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.body_limit = connection.max_small_body
        self.too_large = False
        self.complete = False
        self.body_waiter: asyncio.Future[None] | None = None
        self.client_gone = False
        self.failure: GatewayError | None = None  # the body stalled or broke the protocol (408, 400)
        # -- the response --
        self.task: asyncio.Task[None] | None = None
        self.head_sent = False
        self.done = False
        self.chunked = False
        self.head_only = False

    # -- the request --

    def header(self, name: bytes) -> bytes:
        """The value of the first header called `name` (lower case), b"" when there is none."""
        found = self.header_map
        if found is None:
            # Made once, in C, for the two or three looked up with every head; reversed so that the
            # first of a repeated name wins.
            found = self.header_map = dict(reversed(self.headers))
        return found.get(name, b"")

    async def read_body(self) -> bytes:
        """The whole body; GatewayError 413 beyond the limit, ClientDisconnected if the client goes."""
        while not self.complete:
            if self.failure is not None:
                raise self.failure
            if self.too_large:
                break
            if self.client_gone:
                raise ClientDisconnected
            if self.expect_continue:
                self.expect_continue = False
                self.flow.write(CONTINUE)
            self.body_waiter = self.connection.loop.create_future()
            try:
                await self.body_waiter
            finally:
                self.body_waiter = None
        if self.too_large:
            raise errors.body_too_large(self.body_limit)
        parts = self.body_parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def declared_size_error(self) -> GatewayError | None:
        """The 413 of a body whose Content-Length is over the limit, or None: such a body is refused
        with its head (access.py, metrics_http.py), before a byte of it is read or kept."""
        value = self.header(b"content-length")
        if value.isdigit() and int(value) > self.body_limit:
            return errors.body_too_large(self.body_limit)
        return None

    def take_body(self, data: bytes) -> None:
        """A piece of the body from the parser: kept within the limit, dropped once it cannot be used."""
        if self.too_large or self.done or self.rejected is not None:
            return  # answered already (413, 401, ...): the rest is not kept, and the connection will close
        self.body_size += len(data)
        if self.body_size > self.body_limit:
            self.too_large = True
            self.body_parts = []
        else:
            self.body_parts.append(data)
        self._wake()

    def body_complete(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: GatewayError) -> None:
        """The body cannot arrive whole (it stalled, or broke the protocol): its reader gets `error`."""
        if not self.done and self.rejected is None and self.failure is None:
            self.failure = error
            self._wake()

    def gone(self) -> None:
        """The client left: whoever waits for the body or the socket is woken to find out."""
        self.client_gone = True
        self._wake()

    def _wake(self) -> None:
        if self.body_waiter is not None and not self.body_waiter.done():
            self.body_waiter.set_result(None)

    # -- the response --

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        """A whole response in one write; adds content-length unless the headers carry it."""
        if not any(name == b"content-length" for name, _ in headers):
            headers = [*headers, (b"content-length", b"%d" % len(body))]
        self.flow.write(self._head(status, headers) + (b"" if self.head_only else body))
        self._finish()

    def respond_error(self, error: GatewayError, headers: HeaderItems = ()) -> None:
        self.respond(error.status, [(b"content-type", b"application/json"), *headers, *error.headers], error.body())

    def start(self, status: int, headers: Headers, first: bytes = b"") -> None:
        """The head of a response whose body follows with write() and ends with end()."""
        if any(name == b"content-length" for name, _ in headers):
            self.chunked = False
        elif self.http_version == "1.1":
            self.chunked = True
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        else:
            self.keep_alive = False  # an HTTP/1.0 client reads to the end of the connection
        self.flow.write(self._head(status, headers) + self._frame(first))

    def write(self, chunk: bytes) -> None:
        if chunk:
            self.flow.write(self._frame(chunk))

    def end(self, last: bytes = b"") -> None:
        data = self._frame(last)
        self.flow.write(data + b"0\r\n\r\n" if self.chunked else data)
        self._finish()

    def abort(self) -> None:
        """A response that cannot be completed: the client sees the connection drop."""
        self.keep_alive = False
        self._finish()

    def handler_ended(self, task: asyncio.Task[None]) -> None:
        """The task answering this request ended without finishing its response (a bug): the client
        must not hang."""
        if not task.cancelled() and task.exception() is not None:
            log.error("unhandled error in %s %s", self.method, clean(self.path), exc_info=task.exception())
        if self.head_sent or self.client_gone:
            self.abort()
        else:
            self.respond_error(errors.internal_error())

    @property
    def write_paused(self) -> bool:
        return self.flow.write_paused

    async def drain(self) -> None:
        await self.flow.drain()

    def _head(self, status: int, headers: Headers) -> bytes:
        self.head_sent = True
        if not self.complete:
            # Answered before its body arrived (401, 413, 429, ...): rather than read and drop the rest
            # of a body nobody will use, the connection closes after the answer.
            self.keep_alive = False
        if not self.keep_alive or self.connection.closing:
            self.keep_alive = False
            headers = [*headers, (b"connection", b"close")]
        return b"".join(
            [
                status_line(status),
                rendered(self.connection.default_headers),
                *[b"%b: %b\r\n" % header for header in headers],  # a (name, value) pair formats whole
                b"\r\n",
            ]
        )

    def _frame(self, chunk: bytes) -> bytes:
        if not chunk or self.head_only:
            return b""
        return b"%x\r\n%b\r\n" % (len(chunk), chunk) if self.chunked else chunk

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self._wake()
            self.connection.response_done(self)
