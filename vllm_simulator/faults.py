"""Injected failures: which ones are set, how a posted set is checked, and what a crash or exit does.

Faults come as flags at start (cli.py) or at run time through `/_simulator/faults` (control.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, NoReturn

from aiohttp import web

from .errors import ERROR_SHAPES, ApiError, bad_request

log = logging.getLogger(__name__)

# A 1xx status cannot end an HTTP exchange (clients hang or fail to frame the answer), and an
# error fault below 400 would be a success with an error body; neither simulates a real failure.
_FAULT_STATUS_RANGES = {"error_status": (400, 599), "health_status": (200, 599)}
# The active faults are answered as JSON, and orjson encodes integers up to 64 bits only.
_MAX_FAULT_TOKENS = 2**63 - 1
_SECONDS = frozenset({"slow_start", "slow_tokenize", "slow_health"})


@dataclass
class Faults:
    """Injected failures; each applies to every request it concerns until cleared."""

    error_status: int | None = None  # answer inference requests with this status
    # ...in this shape (errors.ERROR_SHAPES): vLLM's OpenAI one by default, or one of those a server
    # or a proxy in front of it answers in
    error_shape: str | None = None
    slow_start: float | None = None  # extra seconds before the first token
    crash_after_tokens: int | None = None  # send N tokens, then close the connection
    exit_after_tokens: int | None = None  # send N tokens, then the whole process exits
    health_status: int | None = None  # /health answers this status
    slow_tokenize: float | None = None  # extra seconds before /tokenize answers
    slow_health: float | None = None  # extra seconds before /health answers: a hung engine's server
    # Cut every answer's body (a whole JSON answer or a stream) after this many bytes, and after every
    # body_piece_bytes, pausing at each cut so that each piece reaches the client in a read of its own.
    split_body_at: int | None = None
    body_piece_bytes: int | None = None

    @classmethod
    def parse(cls, data: Any) -> Faults:
        if not isinstance(data, dict):
            raise bad_request("faults must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise bad_request(f"unknown fault(s) {unknown}; known: {sorted(known)}")
        faults = cls()
        for name, value in data.items():
            if value is None:
                continue
            if name == "error_shape":
                if value not in ERROR_SHAPES:
                    raise bad_request(f"fault error_shape must be one of {list(ERROR_SHAPES)}", name)
                faults.error_shape = value
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad_request(f"fault {name} must be a number >= 0", name)
            if name in _FAULT_STATUS_RANGES:
                low, high = _FAULT_STATUS_RANGES[name]
                if not (low <= value <= high and value == int(value)):
                    raise bad_request(f"fault {name} must be an HTTP status from {low} to {high}", name)
            elif name.endswith("_tokens") and (value != int(value) or value > _MAX_FAULT_TOKENS):
                raise bad_request(f"fault {name} must be a whole number of tokens up to {_MAX_FAULT_TOKENS}", name)
            elif name not in _SECONDS and (value != int(value) or not 1 <= value <= _MAX_FAULT_TOKENS):
                raise bad_request(f"fault {name} must be a whole number of bytes from 1 to {_MAX_FAULT_TOKENS}", name)
            setattr(faults, name, float(value) if name in _SECONDS else int(value))
        return faults

    def active(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value is not None}

    def copy(self) -> Faults:
        return Faults(**asdict(self))

    def raise_injected_error(self) -> None:
        if self.error_status is not None:
            raise ApiError(self.error_status, "Simulated engine failure (injected fault).", shape=self.error_shape)

    @property
    def cuts_body(self) -> bool:
        return self.split_body_at is not None or self.body_piece_bytes is not None

    def stop_after(self, n_tokens: int) -> int | None:
        """Number of tokens after which a crash or exit fault strikes, if one is set."""
        limits = [n for n in (self.crash_after_tokens, self.exit_after_tokens) if n is not None]
        return min([n_tokens, *limits]) if limits else None


def strike(request: web.Request, faults: Faults) -> NoReturn:
    """Carry out a crash or exit fault: the client sees the connection die, no closing chunk.

    A crash marks the request `crashed`, so the generation counts it as crashed, not aborted.
    """
    if faults.exit_after_tokens is not None:
        log.error("SIMULATOR: exiting after %s tokens (injected fault)", faults.exit_after_tokens)
        logging.shutdown()
        os._exit(1)
    request["crashed"] = True
    transport = request.transport
    if transport is not None:
        # Close, not reset: a reset would let the client's kernel discard tokens it already
        # received, and a process that dies after reading its request closes with FIN too.
        transport.close()
    raise asyncio.CancelledError()
