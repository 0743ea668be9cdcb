"""The log's view of an outage of the shared store (Redis): one line when it stops answering, one when
it answers again, instead of a line per refused request (hundreds a second under load)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("vllm_gateway")


class Outage:
    """An outage as one part of the gateway (`what`: "rate limiter", "admission") sees it."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None  # None: Redis answers
        self.refused = 0

    def failed(self, error: Exception, refused: bool = True) -> None:
        """Redis did not answer; `refused`: a request was refused for it (else a background task)."""
        if self.since is None:
            self.since = time.monotonic()
            self.refused = 0
            log.warning(
                "%s: Redis did not answer (%s); requests get 503 store_unavailable until it does", self.what, error
            )
        self.refused += refused

    def answered(self) -> None:
        """Redis answered; callers check `since` first, so that this costs nothing while all is well."""
        if self.since is not None:
            log.info(
                "%s: Redis answers again after %.1f s; %d requests were refused meanwhile",
                self.what,
                time.monotonic() - self.since,
                self.refused,
            )
            self.since = None
