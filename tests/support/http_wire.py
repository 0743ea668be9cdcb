"""A strict reader of HTTP/1.1 responses from raw bytes, for tests that judge what the gateway sends.

Unlike tests.support.gateway.Reader (which trusts the server and reads off a socket), this works on a
buffer that grows as bytes arrive and says what is wrong with a response rather than guessing:

    response, used = take_response(buffer, eof=False)   # (None, 0): more bytes are needed
    buffer = buffer[used:]                               # Malformed: no HTTP/1.1 server may send that
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\t\x20-\x7e\x80-\xff]*")
FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[\t\x20-\x7e\x80-\xff]*)?")
MAX_HEAD = 64 * 1024


class Malformed(Exception):
    """Bytes that are not a well-formed HTTP/1.1 response (or a response cut short by the close)."""


@dataclass
class WireResponse:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in the order sent
    body: bytes

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200

    @property
    def closes(self) -> bool:
        value = self.header("connection") or ""
        return "close" in [part.strip().lower() for part in value.split(",")]

    @property
    def from_simulator(self) -> bool:
        """Relayed from the vLLM simulator (it labels every response) rather than made by the gateway."""
        return self.header("x-vllm-simulator") == "1"

    def summary(self) -> str:
        return f"{self.status} {'close' if self.closes else 'keep-alive'} {self.body[:120]!r}"


def take_response(buffer: bytes, eof: bool, head_only: bool = False) -> tuple[WireResponse | None, int]:
    """The first whole response in `buffer` and how many bytes it took, or (None, 0) if more are needed.

    `eof`: nothing more will come (a response then cut short is Malformed); `head_only`: the response
    answers a HEAD request, so it has no body whatever its headers say.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if _bare_line_feed(buffer):
            raise Malformed(f"a line of the head ends in a bare LF: {buffer[:200]!r}")
        if len(buffer) > MAX_HEAD:
            raise Malformed(f"a response head longer than {MAX_HEAD} bytes")
        if eof and buffer:
            raise Malformed(f"the connection closed in the middle of a response head: {buffer[:200]!r}")
        return None, 0
    head = buffer[:end]
    if _bare_line_feed(head) or b"\r" in head.replace(b"\r\n", b""):
        raise Malformed(f"a bare CR or LF in the response head: {head[:300]!r}")
    status_line, *lines = head.split(b"\r\n")
    match = STATUS_LINE.fullmatch(status_line)
    if not match:
        raise Malformed(f"not an HTTP/1.1 status line: {status_line[:200]!r}")
    status = int(match.group(1))
    headers = []
    for line in lines:
        field = FIELD_LINE.fullmatch(line)
        if not field:
            raise Malformed(f"not a header line: {line[:200]!r}")
        headers.append((field.group(1).decode().lower(), field.group(2).decode("latin-1")))
    response = WireResponse(status, headers, b"")
    start = end + 4
    if status == 101:
        raise Malformed("101 Switching Protocols: the gateway serves no upgrade")
    if response.interim:
        return response, start
    lengths = {value.strip() for name, value in headers if name == "content-length"}
    coding = response.header("transfer-encoding")
    if coding is not None and lengths:
        raise Malformed("both Content-Length and Transfer-Encoding")
    if head_only or status in (204, 304):
        return response, start
    if coding is not None:
        if coding.strip().lower() != "chunked":
            raise Malformed(f"a transfer coding other than chunked: {coding!r}")
        return _take_chunked(buffer, start, eof, response)
    if lengths:
        if len(lengths) > 1 or not all(value.isdigit() for value in lengths):
            raise Malformed(f"a bad Content-Length: {sorted(lengths)}")
        size = int(lengths.pop())
        if len(buffer) - start < size:
            if eof:
                raise Malformed(
                    f"the connection closed {size - (len(buffer) - start)} bytes before the end of a response body"
                )
            return None, 0
        response.body = buffer[start : start + size]
        return response, start + size
    if not response.closes:
        raise Malformed(f"a {status} with neither Content-Length nor chunked framing on a kept connection")
    if not eof:
        return None, 0
    response.body = buffer[start:]
    return response, len(buffer)


def _take_chunked(buffer: bytes, at: int, eof: bool, response: WireResponse) -> tuple[WireResponse | None, int]:
    parts = []
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            if len(buffer) - at > 1024:
                raise Malformed(f"a chunk-size line longer than 1 KB: {buffer[at : at + 100]!r}")
            return _need_more(eof, "in a chunk-size line")
        size_line = buffer[at:line_end]
        match = CHUNK_SIZE.fullmatch(size_line)
        if not match:
            raise Malformed(f"a bad chunk-size line: {size_line[:100]!r}")
        size = int(match.group(1), 16)
        at = line_end + 2
        if size == 0:
            break
        if len(buffer) < at + size + 2:
            return _need_more(eof, "in a chunk")
        if buffer[at + size : at + size + 2] != b"\r\n":
            raise Malformed(f"a chunk not followed by CRLF: {buffer[at + size : at + size + 20]!r}")
        parts.append(buffer[at : at + size])
        at += size + 2
    while True:  # trailer fields, then the empty line
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return _need_more(eof, "after the last chunk")
        line = buffer[at:line_end]
        at = line_end + 2
        if not line:
            response.body = b"".join(parts)
            return response, at
        if not FIELD_LINE.fullmatch(line):
            raise Malformed(f"a bad trailer line: {line[:100]!r}")


def _need_more(eof: bool, where: str) -> tuple[None, int]:
    if eof:
        raise Malformed(f"the connection closed {where} of a chunked response body")
    return None, 0


def _bare_line_feed(data: bytes) -> bool:
    return data.count(b"\n") != data.count(b"\r\n")
