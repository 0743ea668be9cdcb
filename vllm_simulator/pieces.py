"""Answers' bodies written in the pieces the faults ask for (split_body_at, body_piece_bytes).

A client reads a body in whatever pieces the network hands it; a gateway that looks for something
in the body (the usage) must find it wherever a piece ends. These faults put the ends where a test
wants them: the body is cut at the given offsets, and each cut is followed by a pause, so that what
comes after it reaches the client in a read of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from .errors import json_response
from .faults import Faults

# Long enough for the client to read what came before the cut on its own, even on a busy machine.
PIECE_PAUSE = 0.02


class PieceWriter:
    """Writes a response's body, cut where the faults say (no cuts without them)."""

    def __init__(self, response: web.StreamResponse, faults: Faults) -> None:
        self.response = response
        self.split_at = faults.split_body_at
        self.piece = faults.body_piece_bytes
        self.offset = 0  # bytes of the body written so far

    async def write(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            cut = self._next_cut()
            end = len(data) if cut is None else min(len(data), start + cut - self.offset)
            await self.response.write(data[start:end])
            self.offset += end - start
            start = end
            if self.offset == cut:
                await asyncio.sleep(PIECE_PAUSE)

    def _next_cut(self) -> int | None:
        cuts = []
        if self.split_at is not None and self.split_at > self.offset:
            cuts.append(self.split_at)
        if self.piece is not None:
            cuts.append((self.offset // self.piece + 1) * self.piece)
        return min(cuts) if cuts else None


async def json_answer(request: web.Request, body: Any, faults: Faults) -> web.StreamResponse:
    """A whole JSON answer (with its Content-Length, as vLLM sends one), cut as the faults say."""
    if not faults.cuts_body:
        return json_response(body)
    data = orjson.dumps(body)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(data)
    await response.prepare(request)
    await PieceWriter(response, faults).write(data)
    await response.write_eof()
    return response
