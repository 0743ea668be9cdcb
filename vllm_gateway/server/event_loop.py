"""The gateway's event loop: uvloop, except that new connections are accepted in batches.

libuv (under uvloop) accepts one connection per turn of the event loop, so that several processes
on one port share the load. A gateway relaying a thousand streams on one core spends tens of
milliseconds in one turn, so a burst of new clients waits in the kernel's accept queue for seconds:
340 queued connections took 11 s to be accepted, and the slowest 1% of the benchmark's 1024
concurrent streams took 10-14 s instead of 2. nginx accepts the whole queue when the socket is
readable; this loop does the same, then hands each connection to uvloop's own transport.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import uvloop

log = logging.getLogger("vllm_gateway")

# Accepts per readable event: enough for any burst, small enough that one turn stays short.
ACCEPT_BATCH = 1024
# After running out of file descriptors, accepting waits this long instead of spinning.
EMFILE_PAUSE_SECONDS = 0.5
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class BatchAcceptServer(asyncio.AbstractServer):
    """What asyncio's create_server returns, for listening sockets whose accepts this loop does."""

    def __init__(
        self, loop: BatchAcceptLoop, protocol_factory: Callable[[], asyncio.Protocol], sockets: list[socket.socket]
    ) -> None:
        self._loop = loop
        self._protocol_factory = protocol_factory
        self._sockets = sockets
        self._serving = False
        self._closed = asyncio.Event()
        self._handshakes: set[asyncio.Task[Any]] = set()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving or self._closed.is_set():
            return
        self._serving = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept_ready, sock)

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self._closed.wait()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._serving = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)

    def _accept_ready(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as error:
                if error.errno in _OUT_OF_DESCRIPTORS:
                    log.error("cannot accept connections: %s; retrying in %.1f s", error, EMFILE_PAUSE_SECONDS)
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(EMFILE_PAUSE_SECONDS, self._resume_accepting, listener)
                    return
                raise
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._protocol_factory, conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshake_done)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(listener.fileno(), self._accept_ready, listener)

    def _handshake_done(self, task: asyncio.Task[Any]) -> None:
        self._handshakes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("dropped a new connection: %s", task.exception())


class BatchAcceptLoop(uvloop.Loop):
    """uvloop for everything, except plain TCP listening sockets (TLS and options go to uvloop).

    uvicorn takes the class as its loop factory: `loop="vllm_gateway.server.event_loop:BatchAcceptLoop"`.
    """

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        host: str | Iterable[str] | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        reuse_address: bool | None = None,
        start_serving: bool = True,
        **options: Any,
    ) -> asyncio.AbstractServer:
        if ssl is not None or options or (sock is not None and sock.family == socket.AF_UNIX):
            # uvloop's stubs split host/port and sock into overloads; this passes on what it was given.
            passed: dict[str, Any] = dict(
                sock=sock, backlog=backlog, ssl=ssl, reuse_address=reuse_address, start_serving=start_serving, **options
            )
            return await super().create_server(protocol_factory, host, port, **passed)  # type: ignore[arg-type]
        sockets = [sock] if sock is not None else await self._bind(host, port, reuse_address)
        for listener in sockets:
            listener.setblocking(False)
            listener.listen(backlog)
        server = BatchAcceptServer(self, protocol_factory, sockets)
        if start_serving:
            await server.start_serving()
        return server

    async def _bind(
        self, host: str | Iterable[str] | None, port: int | None, reuse_address: bool | None
    ) -> list[socket.socket]:
        hosts = [None] if host in (None, "") else [host] if isinstance(host, str) else list(host)
        infos = []
        for name in hosts:
            infos += await self.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _canonical, address in dict.fromkeys(infos):
                listener = socket.socket(family, kind, proto)
                sockets.append(listener)
                if reuse_address is not False:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                listener.bind(address)
        except OSError:
            for listener in sockets:
                listener.close()
            raise
        return sockets
