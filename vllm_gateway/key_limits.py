"""A key's limits in force: its own where its record sets them, else the gateway's defaults (Settings).

Worked out here only, so that the rate limiter, the token limit and admission never apply a default
of their own, and once per key record, so that a request pays one look-up (by the key's id) for them
all. They are worked out again when the record changed: a key file read again (changed by the API,
the CLI or another worker) makes every record a new object.
"""

from __future__ import annotations

from dataclasses import dataclass

from .keystore import KeyRecord
from .settings import Settings


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What ratelimit.py and admission/ need of a key: its id and the limits in force for it."""

    id: str
    rate: str  # requests per window: its rate_limit, else GATEWAY_RATE_LIMIT
    tokens: str | None  # tokens per window: its token_limit, else GATEWAY_TOKEN_LIMIT; None: no limit
    parallel: int  # requests in flight and waiting: its max_parallel_requests, else GATEWAY_MAX_PARALLEL_REQUESTS
    weight: float  # its share of a busy model's turns (admission/local.py): its weight, else 1


def limits_of(key: KeyRecord, settings: Settings) -> KeyLimits:
    """The one rule: a key's own limit, where it has one, else the setting's."""
    return KeyLimits(
        key.id,
        key.rate_limit or settings.rate_limit,
        key.token_limit or settings.token_limit,
        key.max_parallel_requests or settings.max_parallel_requests,
        key.weight or 1.0,
    )


class KeyLimitsCache:
    """limits_of() for each key of one gateway (its settings), kept with the record it came from."""

    __slots__ = ("settings", "by_id")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.by_id: dict[str, tuple[KeyRecord, KeyLimits]] = {}

    def of(self, key: KeyRecord) -> KeyLimits:
        cached = self.by_id.get(key.id)
        if cached is not None and cached[0] is key:
            return cached[1]
        if cached is not None:
            # A new record for a known key: the key file was read again, so every record is new, and
            # the others (revoked keys' among them) are dropped too rather than kept forever.
            self.by_id.clear()
        limits = limits_of(key, self.settings)
        self.by_id[key.id] = (key, limits)
        return limits
