"""Finding a request body's model without holding the event loop: small bodies are parsed on the loop,
large JSON bodies in a helper process.

orjson parses ordinary JSON at about 2 ms per MiB, but crafted JSON far slower: a 23 MiB body of
nested objects took 1.7 s (75 ms per MiB), 10 million small numbers 0.3 s, and every other client
would wait that long. A thread does not help, since orjson holds the GIL while it parses. So bodies
over INLINE_BYTES go to one helper process per gateway worker, started on first use; the loop only
hands them over (a copy, a few milliseconds for 32 MiB).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from . import errors
from .request_body import body_with_model, json_model, model_from_body, require_model

T = TypeVar("T")

# At most about 5 ms of parsing on the loop, even for the slowest JSON measured (75 ms per MiB).
INLINE_BYTES = 64 * 1024


class BodyParser:
    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    @staticmethod
    def parses_inline(body: bytes, content_type: bytes) -> bool:
        """Whether the body is parsed on the loop (request_body.model_from_body): nearly all are, and
        the caller then saves a coroutine per request."""
        return len(body) <= INLINE_BYTES or content_type.startswith(b"multipart/form-data")

    async def model_of(self, body: bytes, content_type: bytes) -> tuple[str, bool]:
        """request_body.model_from_body's answer, and its GatewayErrors (400)."""
        if self.parses_inline(body, content_type):
            return model_from_body(body, content_type)
        model, no_usage, problem = await self._in_helper(json_model, body)
        if problem is not None:
            raise errors.bad_request(problem, code="invalid_json")
        return require_model(model), no_usage

    async def with_model(self, body: bytes, content_type: bytes, model: str) -> bytes:
        """request_body.body_with_model's answer, from the helper process for a large JSON body (finding
        the value walks the body, at a cost like parsing it)."""
        if self.parses_inline(body, content_type):
            return body_with_model(body, content_type, model)
        return await self._in_helper(body_with_model, body, content_type, model)

    async def _in_helper(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), function, *args)
        except BrokenProcessPool:
            # The helper died (killed, out of memory): the next large body starts a new one.
            self.close()
            raise errors.body_parser_unavailable() from None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the gateway process has threads (the log writer) that fork would copy mid-work.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
