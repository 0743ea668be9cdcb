"""The floor for any proxy hop written in Python: a TCP pipe on uvloop, with no HTTP at all.

It runs on the gateway's own event loop (uvloop with batch accept). Each client connection gets a
backend connection of its own, and bytes go across unchanged in both directions, with
back-pressure. There is no parsing, no routing, no keys, limits or logs, so no Python relay (the
gateway included) can be cheaper per request or per event: the benchmark runs it beside nginx to
show how much of the gateway's cost is Python's event loop and how much is the gateway's own.

Usage: python_pipe.py LISTEN_PORT:BACKEND_PORT ...   (loopback only; stops on SIGTERM)
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vllm_gateway.server.event_loop import BatchAcceptLoop


class Half(asyncio.Protocol):
    """One side of the pipe: what it receives is written to its peer's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Half | None = None
        self.pending: list[bytes] = []  # what arrived before the peer was connected

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        else:
            peer.transport.write(data)

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Back-pressure: when the peer cannot take more, stop reading this side.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


def client_side(backend_port: int):
    def make() -> Half:
        client = Half()
        asyncio.get_running_loop().create_task(connect_backend(client, backend_port))
        return client

    return make


async def connect_backend(client: Half, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    try:
        _transport, backend = await loop.create_connection(Half, "127.0.0.1", backend_port)
    except OSError:
        if client.transport is not None:
            client.transport.close()
        return
    client.peer, backend.peer = backend, client
    for data in client.pending:
        backend.transport.write(data)
    client.pending.clear()


async def main(pairs: list[tuple[int, int]]) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    servers = [
        await loop.create_server(client_side(backend), "127.0.0.1", listen, backlog=4096) for listen, backend in pairs
    ]
    await stop
    for server in servers:
        server.close()


if __name__ == "__main__":
    ports = [tuple(int(p) for p in arg.split(":")) for arg in sys.argv[1:]]
    if not ports or any(len(pair) != 2 for pair in ports):
        sys.exit(__doc__)
    with asyncio.Runner(loop_factory=BatchAcceptLoop) as runner:
        runner.run(main(ports))  # type: ignore[arg-type]
