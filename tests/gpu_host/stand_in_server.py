"""A stand-in for `vllm serve` on a GPU host where vLLM cannot be installed: it takes what vLLM would
take of each GPU it sees (--gpu-memory-utilization of the GPU's whole memory, with PyTorch), holds it
until it exits, and answers /health, /v1/models and a minimal chat completion. Any other vLLM option
is accepted and ignored, so the fleet's command line runs it unchanged:

    VLLM_LAUNCH_COMMAND="python3 tests/gpu_host/stand_in_server.py" bash start_all_models.sh

Like vLLM it requires VLLM_API_KEY (or --api-key), when given, on /v1 only. Standard library and
PyTorch only: the GPU hosts it was written for reach no package registry.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GIB = 1024**3
# What the CUDA context and PyTorch's allocator take beside the block itself: vLLM counts them in
# its share, so the stand-in leaves that much out to take the same total.
CONTEXT_BYTES = GIB // 2


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="?", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--served-model-name", nargs="+", default=[])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY", ""))
    known, _ = parser.parse_known_args()
    return known


def take_gpu_memory(fraction: float) -> list[object]:
    """A block of `fraction` of each visible GPU's memory, filled so that it is really resident."""
    import torch

    blocks = []
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        size = max(0, int(total * fraction) - CONTEXT_BYTES)
        block = torch.empty(size, dtype=torch.uint8, device=f"cuda:{index}")
        block.fill_(1)
        blocks.append(block)
        held, whole = size / GIB, total / GIB
        print(f"stand-in: holding {held:.1f} GiB of GPU {index} ({fraction} of {whole:.1f} GiB)", flush=True)
    torch.cuda.synchronize()
    return blocks


def handler(names: list[str], api_key: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def answer(self, status: int, body: dict[str, object]) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def allowed(self) -> bool:
            if not self.path.startswith("/v1") or not api_key:
                return True
            if self.headers.get("Authorization", "") == f"Bearer {api_key}":
                return True
            self.answer(401, {"error": "Unauthorized"})
            return False

        def do_GET(self) -> None:
            if self.path == "/health":
                self.answer(200, {})
            elif self.path == "/v1/models" and self.allowed():
                self.answer(200, {"object": "list", "data": [{"id": name, "object": "model"} for name in names]})
            elif self.path != "/v1/models":
                self.answer(404, {"error": "Not Found"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v1/chat/completions":
                self.answer(404, {"error": "Not Found"})
                return
            if not self.allowed():
                return
            model = json.loads(body or b"{}").get("model", names[0])
            usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
            choice = {"index": 0, "message": {"role": "assistant", "content": "stand in"}, "finish_reason": "stop"}
            created = int(time.time())
            self.answer(200, {"id": "chatcmpl-stand-in", "object": "chat.completion", "created": created,
                              "model": model, "choices": [choice], "usage": usage})  # fmt: skip

        def log_message(self, format: str, *args: object) -> None:
            pass  # the fleet's log keeps what matters: what it holds

    return Handler


def main() -> None:
    args = options()
    names = args.served_model_name or [args.model or args.weights or "stand-in"]
    blocks = take_gpu_memory(args.gpu_memory_utilization)
    server = ThreadingHTTPServer((args.host, args.port), handler(names, args.api_key))
    print(f"stand-in: {', '.join(names)} on {args.host}:{args.port} with {len(blocks)} GPU(s)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
