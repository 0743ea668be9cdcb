"""Reading requests off one client connection: bytes in, exchanges (server.exchange.Exchange) out.

httptools calls back the object it parses for, so this reader is that object: it builds each
request's head within the connection's limits (the request line, the head's size, its number of
lines, what the parser may hold of an unfinished head), hands each body piece to its exchange, and
serves a request that asks for a protocol upgrade as plain HTTP/1.1. A complete head goes to the
connection (Receiver.head_received), which decides when it is answered; a head over a limit, or bytes
that are not HTTP, go to Receiver.fail.

Its own object, apart from the connection's lifetime (server/protocol.py) and from each exchange's, because
its state (the head so far, the bytes fed) lasts from one head's first byte to its last.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Sequence
from itertools import chain
from typing import Protocol

import httptools

from .. import errors
from ..errors import GatewayError
from .exchange import Connection, Exchange
from .hooks import Limits

log = logging.getLogger("vllm_gateway")


class Receiver(Connection, Protocol):
    """What the reader hands its requests to (http_protocol.GatewayProtocol)."""

    def head_received(self, exchange: Exchange) -> None: ...
    def fail(self, error: GatewayError) -> None: ...
    def last_begun(self) -> Exchange | None: ...


def head_size(headers: Sequence[tuple[bytes, bytes]]) -> int:
    """The bytes of a head's header lines, each with its ": " and CRLF: what the head limits count, of
    a request's head here and of a backend's answer (upstream.py). Summed in C, for every request."""
    return sum(map(len, chain.from_iterable(headers))) + 4 * len(headers)


class BadHead(Exception):
    """Raised from a parser callback: the head is over a limit (414, 431) or cannot be served (400)."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class RequestReader:
    def __init__(self, connection: Receiver, limits: Limits, relay_paths: frozenset[str]) -> None:
        self.connection = connection
        self.max_request_line = limits.max_request_line
        self.max_head_bytes = limits.max_head_bytes
        self.max_headers = limits.max_headers
        self.max_body = limits.max_body
        self.relay_paths = relay_paths
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Exchange | None = None  # the request whose bytes are arriving
        self.resuming: Exchange | None = None  # see _refuse_upgrade
        # -- the head being read --
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []  # the exchange's, being filled
        self.head_fed = 0  # bytes given to the parser while the current head is unfinished
        self.head_began = False  # a head began during the current feed

    def feed(self, data: bytes | memoryview) -> bool:
        """Parse `data`; False when the client broke the protocol and nothing more is to be read."""
        parsing = self.parsing
        if (parsing is None or not parsing.head_complete) and len(data) > self.max_head_bytes:
            return self._feed_slices(data)
        self.head_began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            return self._refuse_upgrade(data[upgrade.args[0] :])
        # Each `except` names its own exception: mypyc types a name by its first binding.
        except httptools.HttpParserCallbackError as callback_error:
            cause = callback_error.__context__
            if isinstance(cause, BadHead):
                self.connection.fail(cause.error)
            else:  # a bug in a callback: the client must not hang
                log.error("error while parsing a request", exc_info=cause)
                self.connection.fail(errors.bad_request("The request could not be parsed.", code="invalid_http"))
            return False
        except httptools.HttpParserError as parse_error:
            self.connection.fail(errors.bad_request(f"Invalid HTTP request: {parse_error}.", code="invalid_http"))
            return False
        parsing = self.parsing
        if parsing is not None and not parsing.head_complete:
            # The parser keeps an unfinished header line itself: bound what it may have been given.
            self.head_fed = len(data) if self.head_began else self.head_fed + len(data)
            if self.head_fed > 2 * self.max_head_bytes:
                self.connection.fail(errors.head_too_large(f"a head over {self.max_head_bytes} bytes"))
                return False
        return True

    def _feed_slices(self, data: bytes | memoryview) -> bool:
        # Fed in slices, so that an unfinished head never holds much more than its limit.
        view = memoryview(data)
        step = self.max_head_bytes
        return all(self.feed(view[start : start + step]) for start in range(0, len(data), step))

    def forget(self) -> Exchange | None:
        """The request whose bytes were arriving, which will get no more of them."""
        parsing, self.parsing = self.parsing, None
        return parsing

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self.head_began = True
        if self.resuming is not None:
            self.parsing = self.resuming
            return
        self.url = b""
        self.parsing = Exchange(self.connection)
        self.headers = self.parsing.headers

    def on_url(self, url: bytes) -> None:
        if self.resuming is not None:
            return
        self.url += url
        # The request line is the method, the target and the version, with two spaces.
        if len(self.url) + len(self.parser.get_method()) + 10 > self.max_request_line:
            raise BadHead(errors.request_line_too_long(self.max_request_line))

    def on_header(self, name: bytes, value: bytes) -> None:
        # It runs for every header line of every request: the count is bounded here, the head's
        # size once it is complete (on_headers_complete), and what the parser is given of an
        # unfinished head by feed(), which together bound what one head can hold.
        if self.resuming is not None:
            return
        headers = self.headers
        if len(headers) >= self.max_headers:
            raise BadHead(errors.head_too_large(f"more than {self.max_headers} header lines"))
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            assert self.parsing is not None
            self.parsing.expect_continue = True
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        if self.resuming is not None:
            self.resuming = None
            return  # the replayed head of a refused upgrade: this request is already under way
        # The request line's target and the header lines.
        if len(self.url) + head_size(self.headers) > self.max_head_bytes:
            raise BadHead(errors.head_too_large(f"a head over {self.max_head_bytes} bytes"))
        parser = self.parser
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            raise BadHead(errors.bad_request("The request target is not a path.", code="invalid_http")) from None
        exchange.method = parser.get_method().decode("ascii")
        exchange.http_version = parser.get_http_version()
        exchange.keep_alive = parser.should_keep_alive()
        exchange.head_only = exchange.method == "HEAD"
        exchange.head_complete = True
        exchange.raw_path = url.path
        path = url.path.decode("ascii")
        exchange.path = urllib.parse.unquote(path) if "%" in path else path
        # None when there is none, whatever httptools' stubs say (mypyc checks the declared type).
        query: bytes | None = getattr(url, "query")  # noqa: B009 (an attribute read would be checked)
        exchange.query_string = query or b""
        exchange.relay = exchange.method == "POST" and exchange.path in self.relay_paths
        if exchange.relay:
            exchange.body_limit = self.max_body
        self.connection.head_received(exchange)

    def on_body(self, body: bytes) -> None:
        assert self.parsing is not None
        self.parsing.take_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.parsing = None
        exchange.body_complete()

    # -- upgrades --

    def _refuse_upgrade(self, rest: bytes | memoryview) -> bool:
        """llhttp stops at a request that asks for an upgrade (`curl --http2` asks for h2c) and takes
        all that follows its head, the body included, as another protocol. Nothing here is upgraded,
        so the request is served as plain HTTP/1.1: a fresh parser reads on, and where the request has
        a body, a replayed head that frames the same body hands that body to the same request."""
        exchange = self.parsing if self.parsing is not None else self.connection.last_begun()
        self.parser = httptools.HttpRequestParser(self)
        if exchange is not None:
            framing = [(n, v) for n, v in exchange.headers if n in (b"content-length", b"transfer-encoding")]
            if framing:
                exchange.complete = False  # llhttp ended the message at its head
                self.resuming = exchange
                replayed = b"".join([b"POST / HTTP/1.1\r\n", *[n + b": " + v + b"\r\n" for n, v in framing], b"\r\n"])
                if not self.feed(replayed):
                    return False
        return self.feed(rest) if len(rest) else True
