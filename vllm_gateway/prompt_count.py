"""The prompt tokens of a request whose usage never came.

vLLM reports a request's tokens in its answer's usage. When the client leaves before that (a
non-streamed request given up on, a stream closed early) or the backend cuts the answer, no usage
comes, though vLLM read the whole prompt, and a long prompt can cost more than the answer. So, on that
path only, the prompt is counted apart:

- chat and text completions: by the backend's `/tokenize`, sent the request's own body. vLLM's
  tokenize takes the same fields (`messages` with `tools`, `chat_template_kwargs`,
  `add_generation_prompt`..., or `prompt`), with the same defaults, and ignores the others, so its
  count is the prompt_tokens the usage would have said. It gets GATEWAY_PROMPT_COUNT_TIMEOUT seconds.
- otherwise (another endpoint, a prompt tokenize does not take, the backend gone, slow or refusing):
  an estimate, the body's bytes / 4, set before anything is asked, so that it stands whatever happens
  to the question.

The client is gone or has its whole answer by then, so none of this delays it; the request's log line,
ledger entry and token count wait for it, bounded by the timeout.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from .outcome import Outcome
from .registry import BackendState
from .state import GatewayState
from .upstream import UpstreamError

log = logging.getLogger("vllm_gateway")

# The endpoints whose prompt vLLM's /tokenize reads from the request body as it is.
TOKENIZED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# The endpoints whose answers report tokens (the others: tokenize, detokenize, transcriptions).
COUNTED_PATHS = TOKENIZED_PATHS | {
    "/v1/responses",
    "/v1/embeddings",
    "/v1/score",
    "/v1/rerank",
    "/v2/rerank",
    "/score",
    "/rerank",
    "/pooling",
    "/classify",
}
BYTES_PER_TOKEN = 4


def estimate(body: bytes) -> int:
    return -(-len(body) // BYTES_PER_TOKEN)


async def count_prompt(state: GatewayState, path: str, request_id: bytes, outcome: Outcome) -> None:
    """Fill in the prompt tokens of `outcome`, a request sent to a backend whose usage never came:
    that backend (or another of its model, when it is not ready) tokenizes the body, else an estimate."""
    assert outcome.sent is not None
    sent_to, body = outcome.sent
    outcome.prompt_tokens, outcome.prompt_from = estimate(body), "estimate"
    if path not in TOKENIZED_PATHS:
        return
    model = state.registry.resolve(outcome.ledger_model)
    others = model.backends if model is not None else []
    backend = next((b for b in (sent_to, *others) if b.state is BackendState.READY), None)
    if backend is None:
        return
    headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id), *backend.auth]
    try:
        async with asyncio.timeout(state.settings.prompt_count_timeout):
            response = await state.upstream.request(b"POST", backend.base_url, b"/tokenize", headers, body)
            read = False
            try:
                answer = await response.read_all()
                read = True
            finally:
                if read:
                    response.release()
                else:
                    response.close()
    except (TimeoutError, UpstreamError) as error:
        log.info("could not tokenize the prompt of request %s at %s (%s)", request_id.decode(), backend.spec.id, error)
        return
    count = None
    if response.status == 200:
        try:
            count = orjson.loads(answer).get("count")
        except (orjson.JSONDecodeError, AttributeError):
            pass
    if type(count) is int and count >= 0:
        outcome.prompt_tokens, outcome.prompt_from = count, "tokenize"
