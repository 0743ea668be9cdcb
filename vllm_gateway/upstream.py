"""The HTTP/1.1 client towards vLLM: keep-alive connection pools, responses parsed by httptools.

Written for the relay rather than taken from aiohttp or httpx because it runs for every request and
every token: on one core a relay on httpx measured about 160 requests/s, on aiohttp's client about
1,100, and on this client several times that (README, Performance). It does only what a relay needs:
send one request with a body, hand back the status, headers and body chunks as they arrive, apply
back-pressure, and close the connection at once when the client goes away, which is how vLLM learns
to abort the generation.

Headers cross by allow-list towards vLLM, so the client's API key, cookies and hop-by-hop headers never
reach a backend.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass
from time import perf_counter
from typing import Final, Protocol
from urllib.parse import urlsplit

import httptools

from .server.reader import head_size

Headers = list[tuple[bytes, bytes]]

FORWARDED_REQUEST_HEADERS: Final = frozenset({b"content-type", b"accept", b"user-agent"})
DROPPED_RESPONSE_HEADERS: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-connection",
        b"server",
        b"date",
        b"x-request-id",
        b"set-cookie",
    }
)

# Pause reading from vLLM when this much is waiting for a slow client, resume below a quarter of it.
HIGH_WATER: Final = 256 * 1024
MAX_IDLE_PER_BACKEND: Final = 256


class UpstreamError(Exception):
    """The backend failed: the connection broke or it sent something that is not HTTP."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made: nothing reached the backend, another one may take the request."""


class UpstreamConnectTimeout(UpstreamConnectError):
    """The backend did not accept the connection within the connect timeout."""


class UpstreamTimeout(UpstreamError):
    """The backend sent nothing for longer than the read timeout."""


class StaleConnection(UpstreamError):
    """A pooled connection was closed by the backend before it answered: safe to send again."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: bool
    host_header: bytes
    prefix: str

    @classmethod
    def parse(cls, base_url: str) -> Target:
        parts = urlsplit(base_url)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        return cls(parts.hostname or "127.0.0.1", port, tls, parts.netloc.encode(), parts.path.rstrip("/"))


class Sink(Protocol):
    """Where a relayed body goes: the client's side of the gateway (server.exchange.Exchange)."""

    @property
    def write_paused(self) -> bool: ...

    def write(self, chunk: bytes) -> None: ...

    async def drain(self) -> None: ...


class Response:
    """A response being received: status and headers first, then the body chunk by chunk.

    Pieces are queued for read_chunk(), or, once a sink is given (send_body_to), written to it, by
    the response alone: after each read from the backend, all that read brought in one write, while
    the sink keeps up (a token stream then costs no task wake-up per event, and a burst of events
    stays one write); by the task in send_body_to while the sink is paused.
    """

    __slots__ = (
        "status",
        "headers",
        "_connection",
        "_chunks",
        "_buffered",
        "_waiter",
        "_done",
        "_error",
        "_sink",
        "first_body_at",
        "sized",
        "encoded",
    )

    def __init__(self, connection: Connection) -> None:
        self.status = 0
        self.headers: Headers = []
        self._connection = connection
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: UpstreamError | None = None
        self._sink: Sink | None = None
        self.first_body_at = 0.0  # perf_counter() when the first body bytes came (metrics: TTFT)
        # From the head: the body has a Content-Length; it has a content coding (gzip, ...), which the
        # gateway asked not to get and cannot read, so it passes such a body on unchanged.
        self.sized = False
        self.encoded = False

    async def send_body_to(self, sink: Sink) -> None:
        """Write the rest of the body to `sink` as it arrives; returns once all of it went, raises
        UpstreamError when the backend failed first. What each read from the backend brings goes in
        one write from the read itself (_flush) while the sink keeps up; this task wakes only to
        write what queued up while the sink was paused, then waits for it to drain, and at the end."""
        self._sink = sink
        # read_chunk()'s loop, inlined: this coroutine is a stream's only one however often it wakes.
        while True:
            if self._chunks:
                sink.write(self._take())
                if sink.write_paused:
                    await sink.drain()
                continue
            if self._error is not None:
                raise self._error
            if self._done:
                return
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def content_type(self) -> bytes:
        for name, value in self.headers:
            if name == b"content-type":
                return value
        return b""

    async def read_chunk(self) -> bytes:
        """Everything received since the last call (waiting for more if nothing is), b"" at the end."""
        while True:
            if self._chunks:
                return self._take()
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def at_end(self) -> bool:
        """Everything has arrived and been read: the next read_chunk() would return b""."""
        return self._done and not self._chunks and self._error is None

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool if it can be reused."""
        self._connection.finish_response(reusable=self._done and self._error is None)

    def close(self) -> None:
        """Drop the connection now; vLLM sees the disconnect and aborts the request."""
        self._connection.finish_response(reusable=False)

    # -- fed by the connection --

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered > HIGH_WATER:
            self._connection.resume()
        self._buffered = 0
        return data

    def _feed(self, data: bytes) -> None:
        if not self.first_body_at:
            self.first_body_at = perf_counter()
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._connection.pause()
        if self._sink is None:
            self._wake()  # with a sink, _flush() decides after the read

    def _flush(self) -> None:
        """After each read from the backend: what it brought goes to the sink in one write, or, while
        the sink is paused, is left for send_body_to's task (which waits for the client to drain)."""
        sink = self._sink
        if sink is None or not self._chunks:
            return
        if sink.write_paused:
            self._wake()
        else:
            sink.write(self._take())

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._done:
            self._error = error
            self._wake()


class Connection(asyncio.Protocol):
    """One keep-alive connection to a backend; carries one request at a time."""

    def __init__(self, pool: UpstreamPool, target: Target) -> None:
        self.pool = pool
        self.target = target
        self.loop = pool.loop
        self.transport: asyncio.Transport  # from connection_made, before anything is sent
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.response_headers: Headers = []  # the response's, being filled by the parser
        # A new one per request (send); this first one is done, so nothing can fail it unawaited.
        self.headers_ready: asyncio.Future[None] = self.loop.create_future()
        self.headers_ready.set_result(None)
        self.closed = False
        self.reused = False
        # Bytes of the response given to the parser while its head is incomplete; -1 once it is
        # complete (or before the first request). The head is bounded as a request's is: the parser
        # holds an unfinished header whole.
        self.head_fed = -1
        self.until_close = False
        self.keep_alive = False
        self.paused = False
        self.last_io = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- used by the pool and the response --

    def send(self, head: bytes, body: bytes) -> Response:
        self.response = Response(self)
        self.response_headers = self.response.headers
        self.headers_ready = self.loop.create_future()
        self.until_close = self.keep_alive = False
        self.head_fed = 0
        self.last_io = self.loop.time()
        if self.timer is None:  # else a timer of an earlier request, due sooner: it re-arms
            self.timer = self.loop.call_later(self.pool.read_timeout, self._check_timeout)
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        return self.response

    def finish_response(self, reusable: bool) -> None:
        if self.response is None:
            return
        self.response = None
        if reusable and self.keep_alive and not self.closed:
            self.reused = True
            self.pool.put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if hasattr(self, "transport"):
                self.transport.close()

    def pause(self) -> None:
        if not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.closed and self.paused:
            self.paused = False
            self.transport.resume_reading()

    # -- asyncio protocol --

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_io = self.loop.time()
        if self.head_fed >= 0:
            # All fed before was the head: beyond the limit it is refused without waiting for its end.
            if self.head_fed > self.pool.max_head_bytes:
                self._fail(self._head_too_large())
                self.close()
                return
            self.head_fed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            cause = error.__context__  # raised by a callback (on_headers_complete)
            self._fail(
                cause if isinstance(cause, UpstreamError) else UpstreamError(f"invalid HTTP from the backend: {error}")
            )
            self.close()
            return
        if self.response is not None:
            self.response._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        response = self.response
        if response is None:
            return
        if self.until_close and response.status:
            response._finish()  # a body without a length ends with the connection
        elif self.head_fed == 0 and self.reused:
            self._fail(StaleConnection("the backend closed an idle connection"))
        else:
            self._fail(UpstreamError("the backend closed the connection mid-response"))

    # -- httptools callbacks --

    # The parser runs only while a response is expected (send() made it), hence the asserts.

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status = self.parser.get_status_code()
        # What was fed holds the head and maybe some body: only when it is over the limit is the head
        # itself measured.
        if self.head_fed > self.pool.max_head_bytes and head_size(response.headers) > self.pool.max_head_bytes:
            raise self._head_too_large()
        self.head_fed = -1
        names = dict(response.headers)  # only its keys are read: made in C, unlike a set comprehension
        response.sized = b"content-length" in names
        self.until_close = not response.sized and b"transfer-encoding" not in names
        response.encoded = b"content-encoding" in names and any(
            name == b"content-encoding" and value.strip().lower() != b"identity" for name, value in response.headers
        )
        # Read here: once the message is complete the parser no longer knows.
        self.keep_alive = self.parser.should_keep_alive() and not self.until_close
        if not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._finish()

    # -- internals --

    def _head_too_large(self) -> UpstreamError:
        return UpstreamError(f"its response head is over {self.pool.max_head_bytes} bytes")

    def _fail(self, error: UpstreamError) -> None:
        if not self.headers_ready.done():
            self.headers_ready.set_exception(error)
        if self.response is not None:
            self.response._fail(error)

    def _check_timeout(self) -> None:
        # One timer per connection, re-armed only when it fires: cheaper than one per request or chunk.
        self.timer = None
        if self.response is None or self.closed:
            return
        idle = self.loop.time() - self.last_io
        if idle >= self.pool.read_timeout:
            self._fail(UpstreamTimeout(f"no data for {self.pool.read_timeout:g} s"))
            self.close()
        else:
            self.timer = self.loop.call_later(self.pool.read_timeout - idle, self._check_timeout)


class UpstreamPool:
    """Keep-alive connections per backend, reused most-recent first."""

    def __init__(self, connect_timeout: float, read_timeout: float, max_head_bytes: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_head_bytes = max_head_bytes
        self._idle: dict[Target, list[Connection]] = {}
        self._targets: dict[str, Target] = {}
        self._tls: ssl.SSLContext | None = None

    async def request(self, method: bytes, base_url: str, path: bytes, headers: Headers, body: bytes = b"") -> Response:
        """Send a request and wait for the response's status and headers."""
        target = self._targets.get(base_url) or self._targets.setdefault(base_url, Target.parse(base_url))
        head = b"".join(
            [
                method,
                b" ",
                target.prefix.encode(),
                path,
                b" HTTP/1.1\r\nHost: ",
                target.host_header,
                # Bodies the gateway may change (stream_usage.py) and count the tokens of must be readable.
                b"\r\nAccept-Encoding: identity\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n",
                *[name + b": " + value + b"\r\n" for name, value in headers],
                b"\r\n",
            ]
        )
        connection = self._take_idle(target)
        if connection is not None:
            try:
                return await self._exchange(connection, head, body)
            except StaleConnection:
                pass  # uvicorn under vLLM drops idle connections after 5 s; the request never arrived
        return await self._exchange(await self._connect(target), head, body)

    async def _exchange(self, connection: Connection, head: bytes, body: bytes) -> Response:
        response = connection.send(head, body)
        try:
            await connection.headers_ready
        except BaseException:
            response.close()
            raise
        return response

    def put_idle(self, connection: Connection) -> None:
        idle = self._idle.setdefault(connection.target, [])
        if len(idle) < MAX_IDLE_PER_BACKEND:
            idle.append(connection)
        else:
            connection.close()

    def _take_idle(self, target: Target) -> Connection | None:
        idle = self._idle.get(target)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self, target: Target) -> Connection:
        if target.tls and self._tls is None:
            self._tls = ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: Connection(self, target), target.host, target.port, ssl=self._tls if target.tls else None
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise UpstreamConnectTimeout(f"connect timed out after {self.connect_timeout:g} s") from None
        except OSError as error:
            raise UpstreamConnectError(f"connect failed: {error.strerror or error}") from None
        return connection

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def request_headers(client_headers: Headers, request_id: bytes) -> Headers:
    headers = [(name, value) for name, value in client_headers if name in FORWARDED_REQUEST_HEADERS]
    headers.append((b"x-request-id", request_id))
    return headers


def response_headers(upstream: Response) -> Headers:
    return [(name, value) for name, value in upstream.headers if name not in DROPPED_RESPONSE_HEADERS]


def without_length(headers: Headers) -> Headers:
    """The headers of a body the gateway changes: its Content-Length is the backend's, no longer true, so
    the client's side frames the body itself (chunked, or to the close for an HTTP/1.0 client)."""
    return [(name, value) for name, value in headers if name != b"content-length"]
