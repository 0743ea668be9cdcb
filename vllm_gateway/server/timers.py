"""The clocks of one client connection: how long it may take to send a head or the next piece of a
body, or to stay idle between requests; how long it may leave its answer unread; and the probe that
tells a client that half-closed from one that left. One handle per clock, re-armed.

What the clocks read of the connection, and what they do when one runs out, is the TimedConnection
protocol below (http_protocol.GatewayProtocol is one)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Final, Protocol

from .. import errors
from ..errors import GatewayError
from .exchange import CONTINUE, Exchange
from .flow import FlowControl
from .hooks import Limits
from .reader import RequestReader

log = logging.getLogger("vllm_gateway")

# A client that sent EOF and still waits for an answer after this long is probed (probe_closed_client);
# its socket's state is then read this soon, and again at this interval until the answer starts.
EOF_PROBE_SECONDS: Final = 0.02
EOF_CHECK_FIRST_SECONDS: Final = 0.05
EOF_CHECK_SECONDS: Final = 1.0
_TCP_CLOSE = 7  # tcp_info.tcpi_state of a socket that the peer reset
# TLS has no half-close here, so a lingering close over TLS ends our side (close_notify) only once the
# client has sent nothing for this long (nginx's lingering_timeout 5 s): bytes that come after it make
# asyncio's TLS transport reset the connection, and the reset can destroy the answer. (uvloop's reads
# and drops them, but GATEWAY_LOOP=asyncio serves TLS too.)
LINGER_QUIET_SECONDS: Final = 5.0

# What the read timer waits for.
IDLE: Final = "idle"
HEAD: Final = "head"
BODY: Final = "body"


class TimedConnection(Protocol):
    """The client connection the clocks are of."""

    loop: asyncio.AbstractEventLoop
    limits: Limits
    transport: asyncio.Transport
    flow: FlowControl
    reader: RequestReader
    active: Exchange | None  # the request being answered
    queued: deque[Exchange]
    served: int  # requests answered: the next wait is a keep-alive's

    def fail(self, error: GatewayError) -> None: ...

    def close_idle(self) -> None: ...


class ConnectionTimers:
    def __init__(self, connection: TimedConnection) -> None:
        self.connection = connection
        self.loop = connection.loop
        self.limits = connection.limits
        # -- reading: a head, a body, or the next request --
        self.read_timer: asyncio.TimerHandle | None = None
        self.read_timer_when = 0.0
        self.read_phase: str | None = None
        self.read_deadline = 0.0  # of the phase: the timer may be due earlier, never later
        self.head_deadline: float | None = self.loop.time() + self.limits.head_timeout
        self.last_read = 0.0
        # -- writing: an answer that is not read --
        self.send_timer: asyncio.TimerHandle | None = None
        self.unsent = 0  # bytes waiting to be sent when the send timer was last armed
        # -- a client that sent EOF --
        self.eof_timer: asyncio.TimerHandle | None = None
        # -- a closing connection that reads what still comes (http_protocol.GatewayProtocol.linger) --
        self.linger_timer: asyncio.TimerHandle | None = None
        self.quiet_timer: asyncio.TimerHandle | None = None  # over TLS: when to send close_notify

    def cancel(self) -> None:
        for timer in (self.read_timer, self.send_timer, self.eof_timer, self.linger_timer, self.quiet_timer):
            if timer is not None:
                timer.cancel()

    def linger(self) -> None:
        """The connection is closing: no request is awaited any more, and it is dropped after the
        linger timeout whatever the client does. Over TLS, our side ends once the client is quiet."""
        self.read_phase = None
        transport = self.connection.transport
        self.linger_timer = self.loop.call_later(self.limits.linger_timeout, transport.abort)
        if not transport.can_write_eof():
            self.last_read = self.loop.time()
            self.quiet_timer = self.loop.call_later(LINGER_QUIET_SECONDS, self._close_when_quiet)

    def dropped(self) -> None:
        """Bytes came that are read only to be dropped: over TLS, the client is not quiet yet."""
        self.last_read = self.loop.time()

    def _close_when_quiet(self) -> None:
        quiet_from = self.last_read + LINGER_QUIET_SECONDS
        if self.loop.time() < quiet_from:
            self.quiet_timer = self.loop.call_at(quiet_from, self._close_when_quiet)
            return
        self.quiet_timer = None
        self.connection.transport.close()  # close_notify after the answer; the client then closes

    # -- reading --

    def head_complete(self) -> None:
        self.head_deadline = None

    def watch_reading(self) -> None:
        """Arm the read timer for what the connection waits for now: a first head (from the connection's
        start), the next request (keep-alive), the rest of a head, or the next piece of a body."""
        connection = self.connection
        parsing = connection.reader.parsing
        if parsing is None and self.read_phase is None and connection.active is not None:
            return  # answering, nothing armed: the common case after a whole request arrived
        if parsing is None:
            idle = connection.active is None and not connection.queued and not connection.flow.stop_reading
            phase = IDLE if idle else None
        elif connection.flow.reading_paused:
            # Not reading is the gateway's choice (answers wait to be read): the client is not slow.
            phase = None
            self.head_deadline = None
        elif not parsing.head_complete:
            phase = HEAD
        else:
            phase = BODY if parsing.rejected is None and not parsing.done else None
        if phase is self.read_phase:
            if phase is BODY:
                self.last_read = self.loop.time()
            return
        self.read_phase = phase
        if phase is None:
            return  # an armed timer finds nothing to do when it fires
        now = self.loop.time()
        if phase is BODY:
            self.last_read = now
            self._arm(now + self.limits.body_timeout)
        elif phase is IDLE and connection.served:
            self._arm(now + self.limits.keepalive_timeout)
        else:
            if self.head_deadline is None:
                self.head_deadline = now + self.limits.head_timeout
            self._arm(self.head_deadline)

    def _arm(self, deadline: float) -> None:
        # Arming and cancelling a timer for each request costs more than the rest of this module's
        # work for it: a timer due before the deadline is kept, and it re-arms for the deadline it finds.
        self.read_deadline = deadline
        if self.read_timer is not None:
            if self.read_timer_when <= deadline:
                return
            self.read_timer.cancel()
        self.read_timer_when = deadline
        self.read_timer = self.loop.call_at(deadline, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self.read_timer = None
        phase = self.read_phase
        if phase is None:
            return
        deadline = self.last_read + self.limits.body_timeout if phase is BODY else self.read_deadline
        if self.loop.time() < deadline:
            self.read_timer_when = deadline
            self.read_timer = self.loop.call_at(deadline, self._read_timed_out)
            return
        self.read_phase = None
        if phase is IDLE:
            self.connection.close_idle()  # nothing of a request arrived: nothing to answer
        elif phase is HEAD:
            self.connection.fail(errors.request_timeout("request head", self.limits.head_timeout))
        elif phase is BODY:
            self.connection.fail(errors.request_timeout("request body", self.limits.body_timeout))

    # -- writing --

    def writing_paused(self) -> None:
        self.unsent = self.connection.transport.get_write_buffer_size()
        self.send_timer = self.loop.call_later(self.limits.send_timeout, self._send_timed_out)

    def writing_resumed(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def _send_timed_out(self) -> None:
        # As nginx's send_timeout: a client that read some of its answer since the timer was armed
        # is slow, not gone, and gets another period. One that read nothing is dropped, which also
        # ends a relay and with it the generation upstream (a stream's vLLM sequence is freed).
        self.send_timer = None
        unsent = self.connection.transport.get_write_buffer_size()
        if unsent < self.unsent:
            self.unsent = unsent
            self.send_timer = self.loop.call_later(self.limits.send_timeout, self._send_timed_out)
            return
        log.info("dropped a client that read none of its answer for %g s", self.limits.send_timeout)
        self.connection.transport.abort()

    # -- a client that sent EOF --

    def probe_closed_client(self) -> None:
        """A client's EOF may be a half-close (it still reads) or a close (it is gone). An interim
        `100 Continue`, which every HTTP/1.1 client skips, tells them apart: a closed socket answers
        it with a reset, and then the request is dropped (a relay's generation aborted) at once."""
        if self.eof_timer is None:
            self.eof_timer = self.loop.call_later(EOF_PROBE_SECONDS, self._probe)

    def answer_done(self) -> None:
        if self.eof_timer is not None:
            self.eof_timer.cancel()
            self.eof_timer = None

    def _waiting_for_an_answer(self) -> bool:
        active = self.connection.active
        return active is not None and not active.head_sent and not self.connection.transport.is_closing()

    def _probe(self) -> None:
        self.eof_timer = None
        active = self.connection.active
        if not self._waiting_for_an_answer() or active is None or active.http_version != "1.1":
            return  # answered already, or about to be: the answer itself is the probe
        self.connection.flow.write(CONTINUE)
        self.eof_timer = self.loop.call_later(EOF_CHECK_FIRST_SECONDS, self._check_closed_client)

    def _check_closed_client(self) -> None:
        self.eof_timer = None
        if not self._waiting_for_an_answer():
            return
        transport = self.connection.transport
        sock = transport.get_extra_info("socket")
        try:
            reset = (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
                or sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
            )
        except (OSError, AttributeError):
            return  # not a TCP socket here: the next write will tell
        if reset:
            transport.abort()
        else:
            self.eof_timer = self.loop.call_later(EOF_CHECK_SECONDS, self._check_closed_client)
