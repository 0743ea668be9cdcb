"""How unevenly new connections land on the gateway's workers, and what a fixed share of each
server's capacity per worker would do with that (why admission shares its counts through Redis).

    .venv/bin/python benchmarks/worker_spread.py [--rounds 20] [--workers 2] [--streams 8]

A gateway with --workers N (and the redis-server this starts) in front of the simulator at
--max-num-seqs 8 and capacity 8. Each round opens `--streams` streams at once, each on a new
connection, and counts from the workers' metrics snapshots how many each worker took. With a fixed
share (capacity / N per worker), a worker given more than its share makes the excess wait while
another worker's share sits idle; the shared counts let all of them run. Printed: the streams each
worker took per round, and the streams a fixed share would have made wait, against those that
waited with the shared counts (the log's queue_ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import httpx
from servers import REPO, Child, free_port, log, spawn, start_gateway, wait_for_port

CAPACITY = 8


def worker_requests(run_dir: Path) -> dict[str, float]:
    """Requests each live worker counted so far, from its snapshot (written once a second)."""
    counts = {}
    for path in (run_dir / "metrics").glob("*.json"):
        try:
            series = json.loads(path.read_text())["series"]
        except (OSError, ValueError):
            continue
        counts[path.stem] = sum(values[0] for _, values in series)  # values[0]: requests
    return counts


async def burst(url: str, key: str, streams: int) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True}

    async def one() -> None:
        limits = httpx.Limits(max_keepalive_connections=0)  # a new connection, as a new client would
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            headers = {"Authorization": f"Bearer {key}"}
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                await response.aread()

    await asyncio.gather(*(one() for _ in range(streams)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--streams", type=int, default=CAPACITY)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "worker-spread")
    args = parser.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        print("redis-server is missing (scripts/install_test_deps.sh installs it)", file=sys.stderr)
        return 1
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    children: list[Child] = []
    try:
        redis_port, sim_port = free_port(), free_port()
        argv = [server, "--port", str(redis_port), "--save", "", "--appendonly", "no", "--dir", str(work)]
        children.append(spawn("redis", argv, work / "redis.log", None))
        wait_for_port(redis_port, children[-1].proc, "redis", children[-1].log_path)
        sim_argv = [args.python, "-m", "vllm_simulator", "--port", str(sim_port), "--served-model-name", "m"]
        sim_argv += ["--max-num-seqs", str(CAPACITY), "--token-rate", "100"]
        children.append(spawn("simulator", sim_argv, work / "simulator.log", None, cwd=REPO))
        wait_for_port(sim_port, children[-1].proc, "simulator", children[-1].log_path)
        overrides = {
            "GATEWAY_WORKERS": str(args.workers),
            "GATEWAY_RATE_LIMIT_STORAGE": f"redis://127.0.0.1:{redis_port}",
        }
        gateway = start_gateway(
            work / "gateway", args.python, {"m": f"http://127.0.0.1:{sim_port}"}, None, "/bench", overrides, CAPACITY
        )
        children.append(gateway.child)
        run_dir = work / "gateway" / "run"
        deadline = time.monotonic() + 60
        while len(worker_requests(run_dir)) < args.workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers never wrote their metrics snapshots")
            time.sleep(0.2)
        share = CAPACITY // args.workers
        spreads: list[list[int]] = []
        for number in range(args.rounds):
            before = worker_requests(run_dir)
            asyncio.run(burst(gateway.base_url, gateway.key, args.streams))
            time.sleep(1.3)  # the next snapshots
            after = worker_requests(run_dir)
            spreads.append(sorted((int(after[w] - before.get(w, 0)) for w in after), reverse=True))
            log(f"round {number + 1}: {spreads[-1]}")
        log_text = "\n".join(p.read_text() for p in (work / "gateway" / "logs").glob("*.log"))
    finally:
        for child in reversed(children):
            child.stop()

    total = args.rounds * args.streams
    fixed_waits = sum(max(0, taken - share) for spread in spreads for taken in spread)
    shared_waits = sum(" access " in line and "queue_ms=" in line for line in log_text.splitlines())
    uneven = sum(spread[0] > share for spread in spreads)
    print(f"\n{args.rounds} rounds of {args.streams} streams on new connections, {args.workers} workers, capacity 8")
    print(f"  streams per worker, busiest first: {' '.join('/'.join(map(str, s)) for s in spreads)}")
    print(f"  rounds where one worker took more than its fixed share of {share}: {uneven} of {args.rounds}")
    print(f"  streams a fixed share would have made wait: {fixed_waits} of {total} ({fixed_waits / total:.0%})")
    print(f"  streams that waited with the shared counts: {shared_waits} of {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
