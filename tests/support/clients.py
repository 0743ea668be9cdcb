"""HTTP clients for tests, sharing one TLS context per process.

    httpx.get(url, verify=client_tls())            # instead of httpx's default TLS context
    sdk(base_url + "/v1", key).models.list()       # the official openai SDK, no retries

httpx makes a TLS context for every client it is not given one: it loads the CA bundle, 24 ms of CPU
(OpenSSL 3), also for a client that speaks plain HTTP and never uses it. The suite's parallel phase
made about 2,300 of them, nearly a minute of CPU. The tests' helpers and their busiest clients take
this one instead.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any


@functools.cache
def client_tls() -> ssl.SSLContext:
    """The TLS context httpx would make (certifi's CA bundle), made once in this process."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def sdk(base_url: str, api_key: str, trust: ssl.SSLContext | None = None, **kwargs: Any) -> Any:
    """The openai SDK's client for `base_url`, without retries (a test sees the first answer), on
    the SDK's own default HTTP client with `trust` (else the shared TLS context); kwargs go to
    openai.OpenAI."""
    import openai

    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("http_client", openai.DefaultHttpxClient(verify=trust or client_tls()))
    return openai.OpenAI(base_url=base_url, api_key=api_key, **kwargs)
