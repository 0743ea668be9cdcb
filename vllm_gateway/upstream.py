"""The HTTP client towards vLLM, and which headers cross the gateway in each direction.

aiohttp's client, not httpx: on one core a minimal relay measured about 4x the requests/s with it
(see README, Performance). Headers are copied by allow-list towards vLLM, so the client's API key,
cookies and hop-by-hop headers never reach a backend.
"""

from __future__ import annotations

import aiohttp

from .registry import Backend
from .settings import Settings

Headers = list[tuple[bytes, bytes]]

FORWARDED_REQUEST_HEADERS = frozenset({b"content-type", b"accept", b"user-agent"})
DROPPED_RESPONSE_HEADERS = frozenset(
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


def create_session(settings: Settings) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
        ),
        # Relay bytes exactly as vLLM sent them; keep no upstream cookies.
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def request_headers(client_headers: Headers, backend: Backend, request_id: str) -> dict[str, str]:
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in client_headers
        if name in FORWARDED_REQUEST_HEADERS
    }
    headers["X-Request-ID"] = request_id
    if backend.spec.api_key:
        headers["Authorization"] = f"Bearer {backend.spec.api_key}"
    return headers


def response_headers(upstream: aiohttp.ClientResponse) -> Headers:
    return [
        (name.lower(), value)
        for name, value in upstream.raw_headers
        if name.lower() not in DROPPED_RESPONSE_HEADERS
    ]
