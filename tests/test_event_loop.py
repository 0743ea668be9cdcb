"""The gateway's event loop accepts a whole burst of queued connections in one turn, even when each turn
of the loop is slow, and otherwise serves like uvloop."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import uvloop

from vllm_gateway.server.event_loop import BatchAcceptLoop

BURST = 200


class Counting(asyncio.Protocol):
    made = 0
    all_made: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counting.made += 1
        if Counting.made == BURST and Counting.all_made is not None:
            Counting.all_made.set_result(None)


async def turns_to_accept_a_burst() -> int:
    """Queue BURST connections before the server's first turn, then count the (slow) turns the loop takes
    until every connection has reached its protocol."""
    loop = asyncio.get_running_loop()
    Counting.made, Counting.all_made = 0, loop.create_future()
    server = await loop.create_server(Counting, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(BURST)]  # the kernel queues them
    turns = 0

    def busy_turn() -> None:
        nonlocal turns
        turns += 1
        time.sleep(0.005)  # a loop that is busy relaying streams
        if not Counting.all_made.done():
            loop.call_soon(busy_turn)

    loop.call_soon(busy_turn)
    try:
        await asyncio.wait_for(Counting.all_made, timeout=60)
    finally:
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()
    return turns


def run_on(loop_class) -> int:
    with asyncio.Runner(loop_factory=loop_class) as runner:
        return runner.run(turns_to_accept_a_burst())


def test_a_burst_of_queued_connections_is_accepted_within_a_few_turns() -> None:
    assert run_on(BatchAcceptLoop) <= 5


def test_plain_uvloop_needs_a_turn_per_connection_which_is_why_the_gateway_has_its_own_accept() -> None:
    # Pins the libuv behaviour this module works around; if uvloop changes, the workaround can go.
    assert run_on(uvloop.Loop) >= BURST // 2


def test_a_served_connection_echoes_through_the_batch_accept_server() -> None:
    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data.upper())

    async def exchange() -> bytes:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        assert server.is_serving()
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"ping")
        answer = await reader.readexactly(4)
        writer.close()
        server.close()
        await server.wait_closed()
        assert not server.is_serving()
        return answer

    with asyncio.Runner(loop_factory=BatchAcceptLoop) as runner:
        assert runner.run(exchange()) == b"PING"


def test_binding_a_port_in_use_fails_with_the_os_error() -> None:
    async def bind_twice() -> None:
        loop = asyncio.get_running_loop()
        first = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        try:
            with pytest.raises(OSError) as raised:
                await loop.create_server(
                    asyncio.Protocol, "127.0.0.1", first.sockets[0].getsockname()[1], reuse_address=False
                )
            assert "in use" in str(raised.value)
        finally:
            first.close()
            await first.wait_closed()

    with asyncio.Runner(loop_factory=BatchAcceptLoop) as runner:
        runner.run(bind_twice())
