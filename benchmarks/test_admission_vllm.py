"""The pure parts of benchmarks/admission_vllm.py: reading the token count off a streamed event.

.venv/bin/pytest benchmarks/test_admission_vllm.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from admission_vllm import Run, completion_tokens


def test_an_event_with_continuous_usage_gives_the_count_so_far():
    # As vLLM sends it with "stream_options": {"include_usage": true, "continuous_usage_stats": true}.
    event = (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"ab"}}],'
        b'"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7}}'
    )
    assert completion_tokens(event) == 7


def test_events_without_usage_give_none():
    assert completion_tokens(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}') is None
    assert completion_tokens(b"data: [DONE]") is None
    assert completion_tokens(b"") is None


def test_vllm_count_is_per_second_between_the_first_and_last_read():
    assert Run(generated=[(10.0, 1000.0), (14.0, 5000.0)]).vllm_tokens_per_s == 1000.0
    assert Run(generated=[(10.0, 1000.0)]).vllm_tokens_per_s == 0.0  # one read: no span
    assert Run(seconds=0).tokens_per_s == 0.0
