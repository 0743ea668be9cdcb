"""One request and its response on a client connection: the request's head at once, its body as it
arrives, and the writer of the answer (whole, or a head and then pieces).

The connection (http_protocol.GatewayProtocol) feeds it and is told when the response is done; the
relay (proxy.py) and the ASGI bridge (asgi_bridge.py) read from it and answer through it.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import errors
from .errors import GatewayError
from .keystore import KeyRecord
from .request_body import ClientDisconnected

if TYPE_CHECKING:
    from .http_protocol import GatewayProtocol

Headers = list[tuple[bytes, bytes]]
HeaderItems = Sequence[tuple[bytes, bytes]]

REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))


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


class Exchange:
    """One request (its head at once, its body as it arrives) and the writer of its response."""

    __slots__ = (
        "protocol",
        "method",
        "path",
        "raw_path",
        "query_string",
        "headers",
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

    def __init__(self, protocol: GatewayProtocol) -> None:
        self.protocol = protocol
        # -- the request head --
        self.method = "GET"
        self.path = "/"
        self.raw_path = b"/"
        self.query_string = b""
        self.headers: Headers = []
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
        self.body_limit = protocol.max_small_body
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
        for key, value in self.headers:
            if key == name:
                return value
        return b""

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
        value = self.header(b"content-length")
        return value.isdigit() and int(value) > self.body_limit

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
        self.protocol.write(self._head(status, headers) + (b"" if self.head_only else body))
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

    def _head(self, status: int, headers: Headers) -> bytes:
        self.head_sent = True
        if not self.complete:
            # Answered before its body arrived (401, 413, 429, ...): rather than read and drop the rest
            # of a body nobody will use, the connection closes after the answer.
            self.keep_alive = False
        if not self.keep_alive or self.protocol.closing:
            self.keep_alive = False
            headers = [*headers, (b"connection", b"close")]
        return b"".join(
            [
                status_line(status),
                *[name + b": " + value + b"\r\n" for name, value in self.protocol.default_headers],
                *[name + b": " + value + b"\r\n" for name, value in headers],
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
            self.protocol.response_done(self)
