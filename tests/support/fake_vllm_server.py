"""A stand-in for `vllm serve` in the fleet-script tests: a process tree that answers /health.

Like vLLM it starts helper processes (an "engine core" with a "worker" below it) in its own
process group, so the tests can check that stopping a model takes the whole tree. It accepts any
vLLM command line and reports what it was given:

    GET /health        200 once "loaded"
    GET /_fake/info    {"argv": [...], "env": {...}, "pids": [leader, engine, worker]}

Behaviour is set through the environment (FAKE_VLLM_*), so a model's env= key can change it:
    FAKE_VLLM_LOAD_SECONDS    seconds before the port opens (default 0)
    FAKE_VLLM_FAIL_AFTER      exit with status 1 after this many seconds, before serving
    FAKE_VLLM_IGNORE_TERM=1   every process of the tree ignores SIGTERM (so only SIGKILL works)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHILD = "import signal, time\n{ignore}\nimport subprocess, sys\n{spawn}\nwhile True: time.sleep(60)\n"


def option(argv: list[str], name: str, default: str) -> str:
    for index, word in enumerate(argv):
        if word == name and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return default


def start_tree(ignore_term: bool) -> list[int]:
    """An engine process that itself starts a worker, both in our process group."""
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)" if ignore_term else ""
    worker = CHILD.format(ignore=ignore, spawn="")
    spawn = f"w = subprocess.Popen([sys.executable, '-c', {worker!r}]); print('worker', w.pid, flush=True)"
    engine = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(ignore=ignore, spawn=spawn)], stdout=subprocess.PIPE, text=True
    )
    assert engine.stdout is not None
    worker_pid = int(engine.stdout.readline().split()[1])
    return [os.getpid(), engine.pid, worker_pid]


def main() -> int:
    argv = sys.argv[1:]
    host = option(argv, "--host", "127.0.0.1")
    port = int(option(argv, "--port", "8000"))
    ignore_term = os.environ.get("FAKE_VLLM_IGNORE_TERM") == "1"
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = start_tree(ignore_term)
    print(f"fake vLLM: pids {pids}, argv {argv}", flush=True)
    fail_after = os.environ.get("FAKE_VLLM_FAIL_AFTER")
    if fail_after is not None:
        time.sleep(float(fail_after))
        print("fake vLLM: RuntimeError: simulated failure while loading weights", flush=True)
        for pid in pids[1:]:
            os.kill(pid, signal.SIGKILL)
        return 1
    time.sleep(float(os.environ.get("FAKE_VLLM_LOAD_SECONDS", "0")))
    info = json.dumps({"argv": argv, "env": dict(os.environ), "pids": pids}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = {"/health": b"", "/_fake/info": info}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    print(f"fake vLLM: serving on {host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else (lambda *_: sys.exit(0)))
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
