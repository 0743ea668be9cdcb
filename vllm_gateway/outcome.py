"""One relayed request's record, filled in as the request goes (proxy.py) and read as it ends: by its
log line, the metrics (metrics/recording.py), the usage ledger and the prompt count (prompt_count.py).

A module of its own, below all of them, so that each reads it as the class it is: compiled by mypyc
(scripts/compile_gateway.py), a read of a known class's attribute is a load, where one through a
Protocol is a lookup by name.
"""

from __future__ import annotations

from .registry import Backend


class Outcome:
    """What the log line says about one request; filled in as the request goes.

    The defaults are the class's: a request sets only what it learns (most set a third of these), so
    that making one costs a single attribute write rather than a dataclass's twenty."""

    status: int = 500
    key: str = "-"
    model: str = "-"
    backend: str = "-"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # How the prompt tokens were counted when vLLM's usage never came: "tokenize" or "estimate".
    prompt_from: str | None = None
    # For the metrics (metrics/recording.py): time waiting on the backend, a stream's first bytes, the error's type.
    upstream_seconds: float = 0.0
    first_byte_at: float = 0.0
    error_type: str | None = None
    # For the usage ledger: set once the key may use the model it named.
    key_id: str = ""
    ledger_model: str = ""
    # The key's token limit, which the answer's tokens count against before the client has its end.
    token_limit: str | None = None
    tokens_counted: bool = False
    # The backend that took the request and the body it got, once its tokens count (prompt_count.py).
    sent: tuple[Backend, bytes] | None = None
    # Seconds the request waited for a free backend (admission/local.py); None when it went at once.
    queued: float | None = None
    # Of those, the wait for a sleeping or idle-stopped server to come back (wake_on_demand.py).
    wake: float | None = None

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers  # the answer's own: the request id, the key's rate-limit windows
