"""A small Redis client for admission's scripts: one connection, commands written as they come and
their replies matched in order (RESP2 pipelining), no pool and no task per command.

Why not redis-py for this: admission sends two scripts per relayed request. Through redis-py's asyncio
client that cost about 300 us of the gateway's CPU per request (with hiredis; benchmarks/
admission_cost.py), twice what relaying the request costs; most of it is the pool, the command
packing and the parser's layers. This client packs a command in one join and parses the few reply
types scripts return. redis-py still serves everything that is not per request (the channel that
grants arrive on, the heartbeat).

It reads the URLs redis-py does for a plain connection: redis://[[user]:password@]host[:port][/db],
rediss:// (TLS) and unix://[[user]:password@]/path[?db=N].
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

Reply = Any  # bytes, int, None, or a list of replies


class RedisError(Exception):
    """Redis answered with an error (the text after '-')."""


class RedisConnectionError(ConnectionError):
    """The connection to Redis is gone, or could not be made."""


def pack(args: tuple[object, ...]) -> bytes:
    """A command as RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse(buffer: bytes | bytearray, start: int) -> tuple[Reply, int] | None:
    """One reply from `buffer` at `start`, and where the next begins; None while it is incomplete.
    An error reply is returned as a RedisError instance."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return None
    kind, line = buffer[start], bytes(buffer[start + 1 : end])
    after = end + 2
    if kind == 43:  # '+'
        return line, after
    if kind == 45:  # '-'
        return RedisError(line.decode(errors="replace")), after
    if kind == 58:  # ':'
        return int(line), after
    if kind == 36:  # '$'
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            return None
        return bytes(buffer[after : after + size]), after + size + 2
    if kind == 42:  # '*'
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            parsed = parse(buffer, after)
            if parsed is None:
                return None
            item, after = parsed
            items.append(item)
        return items, after
    raise RedisConnectionError(f"Redis sent a reply this client cannot read: {bytes(buffer[start:end])!r}")


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_lost: Callable[[], None] | None = None  # set once the connection is in use
        self.waiting: deque[asyncio.Future[Reply]] = deque()
        self.buffer = bytearray()
        self.outgoing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, without the class

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        position = 0
        try:
            while self.waiting and (parsed := parse(self.buffer, position)) is not None:
                reply, position = parsed
                future = self.waiting.popleft()
                if future.done():
                    continue  # its caller was cancelled; the reply is read all the same
                if isinstance(reply, RedisError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (RedisConnectionError, ValueError) as error:
            self.fail(RedisConnectionError(str(error)))
            if self.transport is not None:
                self.transport.abort()
            return
        del self.buffer[:position]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail(RedisConnectionError(f"the connection to Redis was lost ({exc or 'closed'})"))
        if self.on_lost is not None:
            self.on_lost()

    def fail(self, error: Exception) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, args: tuple[object, ...]) -> asyncio.Future[Reply]:
        if self.transport is None:
            raise RedisConnectionError("the connection to Redis was lost")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self.waiting.append(future)
        # Commands of one turn of the loop leave in one write: one system call for all of them.
        if not self.outgoing:
            loop.call_soon(self.flush)
        self.outgoing.append(pack(args))
        return future

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def flush(self) -> None:
        data, self.outgoing = b"".join(self.outgoing), []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


Call = Callable[..., Awaitable[Reply]]


class RedisPipe:
    """Commands over one pipelined connection, made on first use and again after it drops.

    `prepare` runs on each new connection before any other command goes over it (with a `call` of
    that connection's own), and `lost` when a connection that was in use drops."""

    def __init__(
        self,
        url: str,
        connect_timeout: float = 5.0,
        prepare: Callable[[Call], Awaitable[None]] | None = None,
        lost: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.prepare = prepare
        self.lost = lost
        self.connection: _Connection | None = None
        self.connecting: asyncio.Lock | None = None
        self.generation = 0  # connections made so far: what a reply's connection was, later

    def send(self, *args: object) -> asyncio.Future[Reply] | None:
        """The command's reply as a future when connected; None when a connection must be made first
        (use `call`)."""
        connection = self.connection
        if connection is None or not connection.open:
            return None
        return connection.send(args)

    async def call(self, *args: object) -> Reply:
        future = self.send(*args)
        if future is None:
            await self.connect()
            future = self.send(*args)
            if future is None:
                raise RedisConnectionError("the connection to Redis closed as it opened")
        return await future

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.connection.open

    async def connect(self) -> None:
        if self.connecting is None:
            self.connecting = asyncio.Lock()
        async with self.connecting:
            if self.connection is not None and self.connection.open:
                return
            try:
                self.connection = await asyncio.wait_for(self._open(), self.connect_timeout)
                self.generation += 1
            except (OSError, TimeoutError, RedisError) as error:
                raise RedisConnectionError(f"cannot connect to Redis: {error or 'timed out'}") from None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        parts = urlsplit(self.url)
        query = parse_qs(parts.query)
        if parts.scheme == "unix":
            _, connection = await loop.create_unix_connection(_Connection, parts.path)
            db = query.get("db", ["0"])[0]
        else:
            context = ssl.create_default_context() if parts.scheme == "rediss" else None
            host, port = parts.hostname or "localhost", parts.port or 6379
            _, connection = await loop.create_connection(_Connection, host, port, ssl=context)
            db = parts.path.strip("/") or query.get("db", ["0"])[0]
        try:
            if parts.password is not None:
                user = unquote(parts.username) if parts.username else None
                password = unquote(parts.password)
                await connection.send(("AUTH", user, password) if user else ("AUTH", password))
            if db not in ("", "0"):
                await connection.send(("SELECT", db))
            if self.prepare is not None:
                await self.prepare(lambda *args: connection.send(args))
        except BaseException:
            connection.abort()
            raise
        connection.on_lost = self.lost
        return connection

    def abort(self) -> None:
        """Drop the connection now (Redis stopped answering): every command waiting on it fails."""
        if self.connection is not None:
            self.connection.abort()

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None and connection.transport is not None:
            connection.on_lost = None  # closed on purpose
            connection.transport.close()


class LuaScripts:
    """Scripts run by their SHA (EVALSHA, no keys), loaded again when Redis forgot them (a restart)."""

    def __init__(self, pipe: RedisPipe, sources: dict[str, str]) -> None:
        self.pipe = pipe
        self.sources = sources
        self.sha: dict[str, str] = {}

    async def load(self, call: Call | None = None) -> None:
        """Load every script, over `call` (a connection being prepared) or the pipe."""
        call = call or self.pipe.call
        for name, source in self.sources.items():
            self.sha[name] = (await call("SCRIPT", "LOAD", source)).decode()

    def send(self, name: str, args: list[object]) -> asyncio.Future[Reply] | None:
        """The script's reply as a future, without a task, when connected and loaded; else None."""
        sha = self.sha.get(name)
        return None if sha is None else self.pipe.send("EVALSHA", sha, 0, *args)

    async def run(self, name: str, args: list[object]) -> Reply:
        if name not in self.sha:
            await self.load()
        try:
            return await self.pipe.call("EVALSHA", self.sha[name], 0, *args)
        except RedisError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
            await self.load()
            return await self.pipe.call("EVALSHA", self.sha[name], 0, *args)
