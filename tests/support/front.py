"""Helpers for the tests of the gateway's HTTP front (tests/test_front_*.py): raw sockets that never
wait without a bound, requests built byte by byte, rejections judged as the spec shapes them, and what
a process holds in memory (/proc/PID/status).

    sock, reader = connect(gateway)                     # every recv on it times out after 10 s
    sock.sendall(request(b"GET", "/health"))
    status, headers, body = reader.response()
    assert_rejected((status, headers, body), 408, "request_timeout")
    assert read_to_eof(sock, timeout=5) == b""
    rss_kib(os.getpid())
"""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path

from tests.support.gateway import Gateway, Reader

# How long any single wait on a socket may take before the test fails instead of hanging.
LIVENESS = 10.0


def connect(gateway: Gateway, timeout: float = LIVENESS, rcvbuf: int | None = None) -> tuple[socket.socket, Reader]:
    """A TCP connection to the gateway whose every recv and send gives up after `timeout`.

    `rcvbuf` sets SO_RCVBUF before connecting (so the TCP window is small from the start).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", gateway.port))
    return sock, Reader(sock)


def request(
    method: bytes | str,
    path: str,
    key: str | None = None,
    headers: str = "",
    body: bytes = b"",
    content_length: int | None = None,
) -> bytes:
    """The bytes of one HTTP/1.1 request; `content_length` may declare more than `body` holds."""
    method = method.decode() if isinstance(method, bytes) else method
    lines = [f"{method} {path} HTTP/1.1", "Host: gw"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body or content_length is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    head = "\r\n".join(lines) + "\r\n" + headers + "\r\n"
    return head.encode("latin-1") + body


def send_all(sock: socket.socket, data: bytes) -> bool:
    """sendall, reporting False (not raising) when the gateway has closed or reset the connection."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        return False


def readable(sock: socket.socket, timeout: float = 0.0) -> bool:
    """Whether the gateway has sent something (or closed) within `timeout`."""
    ready, _, _ = select.select([sock], [], [], timeout)
    return bool(ready)


def read_to_eof(sock: socket.socket, timeout: float = LIVENESS, already: bytes = b"") -> bytes:
    """Every byte until the gateway closes (a reset counts as a close). Fails if it stays open."""
    data = bytearray(already)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"the connection was still open after {timeout} s ({len(data)} bytes received: {bytes(data[:200])!r})"
            )
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, ConnectionAbortedError):
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def error_of(body: bytes) -> dict[str, object]:
    """The `error` object of an OpenAI-shaped error body (and a check of its shape)."""
    payload = json.loads(body)
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, payload
    assert isinstance(error["message"], str) and error["message"]
    return error


def assert_rejected(
    response: tuple[int, dict[str, str], bytes], status: int, code: str, error_type: str | None = None
) -> dict[str, object]:
    """A rejection as the spec shapes it: status, JSON error with this code, its length, connection: close."""
    got_status, headers, body = response
    assert got_status == status, (got_status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert headers.get("content-length") == str(len(body)), headers
    assert headers.get("connection", "").lower() == "close", headers
    error = error_of(body)
    assert error["code"] == code, error
    if error_type is not None:
        assert error["type"] == error_type, error
    return error


def response_or_none(reader: Reader, timeout: float) -> tuple[int, dict[str, str], bytes] | None:
    """The next final response, or None if none arrives within `timeout` or the connection closes first.

    Interim responses (`100 Continue`) are skipped, as every HTTP/1.1 client skips them: the gateway
    may send one to probe a client that half-closed.
    """
    reader.sock.settimeout(timeout)
    try:
        while True:
            response = reader.response()
            if not 100 <= response[0] < 200:
                return response
    except (TimeoutError, EOFError, ConnectionResetError):
        return None
    finally:
        reader.sock.settimeout(LIVENESS)


# -- a process's memory --


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")
