"""What admission costs per request, one worker's (in memory) against several workers' (Redis).

    .venv/bin/python benchmarks/admission_cost.py [--requests 4000] [--clients 8] [--capacity 8]

Runs `--requests` acquire/release pairs from `--clients` concurrent callers in this process, against a
real redis-server it starts, for: one worker's admission (admission.Admission) and the shared one
(admission.shared.SharedAdmission), first with room for every caller (no one waits), then with half
the room (half of them wait and are handed a slot by a release). Printed: the CPU this process spends
per request, Redis's own CPU per request, and the wall time an acquire takes (p50, p99); for scale,
the same for the rate-limit check that several workers make through Redis already.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from servers import Child, free_port, log, spawn, wait_for_port

from vllm_gateway.admission.local import Admission
from vllm_gateway.admission.shared import SharedAdmission
from vllm_gateway.key_limits import limits_of
from vllm_gateway.keystore import KeyRecord
from vllm_gateway.model_config import BackendSpec
from vllm_gateway.ratelimit import RateLimiter
from vllm_gateway.registry import BackendState, Registry
from vllm_gateway.settings import Settings


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # clock ticks: 100 per second on Linux


def build(kind: str, redis_url: str, work: Path, capacity: int) -> Admission:
    settings = Settings(workers=2, rate_limit_storage=redis_url, key_file=work / f"{kind}.json", port=1)
    spec = BackendSpec(
        id="m-1", name="m", aliases=(), path="", base_url="http://127.0.0.1:9", api_key=None, max_num_seqs=capacity
    )
    registry = Registry([spec])
    for backend in registry.backends():
        backend.state = BackendState.READY
    return SharedAdmission(settings, registry) if kind == "redis" else Admission(settings, registry)


async def measure(admission: Admission, requests: int, clients: int) -> tuple[float, list[float]]:
    """CPU seconds of this process over `requests` acquire/release pairs, and each acquire's wall time."""
    model = admission.registry.models["m"]
    records = [KeyRecord(id=f"key_{n}", name=f"k{n}", prefix="sk-", hash="-", created_at=0.0) for n in range(4)]
    keys = [limits_of(record, Settings()) for record in records]
    waits: list[float] = []
    left = requests

    async def caller(number: int) -> None:
        nonlocal left
        key = keys[number % len(keys)]
        while left > 0:
            left -= 1
            started = time.perf_counter()
            backend, _ = await admission.acquire(model, key)
            waits.append(time.perf_counter() - started)
            assert backend is not None
            await asyncio.sleep(0)  # the request's own work would come here
            admission.release(backend)

    cpu = time.process_time()
    await asyncio.gather(*(caller(n) for n in range(clients)))
    if isinstance(admission, SharedAdmission):
        while admission.pending:  # releases still on their way to Redis
            await asyncio.gather(*list(admission.pending))
    return time.process_time() - cpu, waits


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def run(redis: Child, redis_url: str, work: Path, args: argparse.Namespace) -> list[str]:
    rows = []
    for room in (args.capacity, args.capacity // 2):
        for kind in ("memory", "redis"):
            admission = build(kind, redis_url, work, room)
            await admission.start()
            await measure(admission, 200, args.clients)  # warm-up: scripts loaded, connections open
            redis_cpu = cpu_seconds(redis.pid)
            cpu, waits = await measure(admission, args.requests, args.clients)
            redis_cpu = cpu_seconds(redis.pid) - redis_cpu
            await admission.stop()
            waited = "none wait" if room >= args.clients else f"{args.clients - room} of {args.clients} wait"
            rows.append(
                f"  {kind:<8}{waited:<16}{cpu / args.requests * 1e6:>12.1f}{redis_cpu / args.requests * 1e6:>12.1f}"
                f"{percentile(waits, 50) * 1e6:>12.0f}{percentile(waits, 99) * 1e6:>12.0f}"
            )
    rows.append(await rate_limit_row(redis, redis_url, args))
    return rows


async def rate_limit_row(redis: Child, redis_url: str, args: argparse.Namespace) -> str:
    """For scale: what a request's rate-limit check costs with the same Redis (ratelimit.py, through
    the `limits` library and redis-py), which several workers pay already."""
    limiter = RateLimiter(redis_url, local=False)

    async def caller(number: int, count: int) -> None:
        for _ in range(count):
            await limiter.hit(f"key_{number % 4}", "1000000000/minute")

    await asyncio.gather(*(caller(n, 25) for n in range(args.clients)))
    redis_cpu, cpu = cpu_seconds(redis.pid), time.process_time()
    per_caller = args.requests // args.clients
    await asyncio.gather(*(caller(n, per_caller) for n in range(args.clients)))
    count = per_caller * args.clients
    cpu, redis_cpu = time.process_time() - cpu, cpu_seconds(redis.pid) - redis_cpu
    return f"  {'limits':<8}{'(rate limit)':<16}{cpu / count * 1e6:>12.1f}{redis_cpu / count * 1e6:>12.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=8)
    args = parser.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        print("redis-server is missing (scripts/install_test_deps.sh installs it)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        port = free_port()
        argv = [server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", directory]
        redis = spawn("redis", argv, work / "redis.log", None)
        try:
            wait_for_port(port, redis.proc, "redis", redis.log_path)
            log(f"{args.requests} requests from {args.clients} callers, capacity {args.capacity} and half that")
            rows = asyncio.run(run(redis, f"redis://127.0.0.1:{port}/0", work, args))
        finally:
            redis.stop()
    print(f"\n  {'store':<8}{'callers':<16}{'CPU us/req':>12}{'Redis us':>12}{'acq p50 us':>12}{'acq p99 us':>12}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
