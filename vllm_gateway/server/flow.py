"""Flow control of one client connection, both ways: answers are written only while the socket takes
them (a writer that finds it full waits in drain()), and requests are read only while their answers
leave as fast as they are made and few requests wait, so that a client that sends but never reads
cannot pile answers up in the gateway's memory.

Its own object, as uvicorn's FlowControl, because these flags and the drain waiter outlive every
request yet are all that an exchange's writes need of the connection. asyncio calls pause_writing and
resume_writing on the protocol (http_protocol.GatewayProtocol), which passes them on here along with
what else they change there (the send timer, the next request).
"""

from __future__ import annotations

import asyncio
from typing import Final

# Requests parsed ahead of the one being answered (pipelining): beyond this, stop reading.
MAX_QUEUED: Final = 4


class FlowControl:
    __slots__ = ("discarding", "drain_waiter", "loop", "reading_paused", "stop_reading", "transport", "write_paused")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.reading_paused = False
        self.stop_reading = False  # for good: the client broke the protocol, or sent EOF
        self.discarding = False  # closing: what the client still sends is read and dropped (discard_input)
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None

    # -- writing --

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake_writers()

    async def drain(self) -> None:
        while self.write_paused and not self.transport.is_closing():
            self.drain_waiter = self.loop.create_future()
            await self.drain_waiter

    def wake_writers(self) -> None:
        """The socket takes data again, or is gone: a writer waiting in drain() goes on to find out."""
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    # -- reading --

    def discard_input(self) -> None:
        """From now on, nothing the client sends is parsed; it is read, to be dropped."""
        self.stop_reading = self.discarding = True
        if self.reading_paused and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    def update_reading(self, queued: int) -> bool:
        """Pause or resume reading for what holds now, with `queued` requests waiting for their turn;
        True when that changed it (the read timer then watches something else)."""
        pause = not self.discarding and (self.stop_reading or self.write_paused or queued >= MAX_QUEUED)
        if pause == self.reading_paused or self.transport.is_closing():
            return False
        self.reading_paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()
        return True
