"""The two calls that put an idle model server to sleep and wake it: vLLM's sleep mode endpoints.

They exist when the server runs with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (commands.py
gives both to a model with idle=sleep). Level 1 copies the weights to CPU memory and drops the KV
cache; mode=wait lets requests already in flight finish first, so going to sleep loses none (a
request that reaches a sleeping server waits in its engine until the wake).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

SLEEP_PATH = "/sleep?level=1&mode=wait"
WAKE_PATH = "/wake_up"


def post(url: str, timeout: float) -> tuple[bool, str]:
    """POST with no body; (answered 200, what it answered or why it failed) — never raises."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with opener.open(request, timeout=timeout) as answer:
            return answer.status == 200, answer.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as error:
        return False, f"answered {error.code}: {error.read(300).decode(errors='replace')}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return False, str(getattr(error, "reason", error))


def put_to_sleep(base_url: str, timeout: float) -> tuple[bool, str]:
    return post(base_url + SLEEP_PATH, timeout)


def wake(base_url: str, timeout: float) -> tuple[bool, str]:
    """Wake every part (weights and KV cache); only a fully awake server counts as woken."""
    answered, text = post(base_url + WAKE_PATH, timeout)
    if not answered:
        return False, text
    try:
        status = json.loads(text).get("status")
    except (ValueError, AttributeError):
        return False, f"answered {text[:200]!r}"
    return (True, text) if status == "awake" else (False, f"still {status} after /wake_up")
