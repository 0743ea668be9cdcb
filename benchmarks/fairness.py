"""Fair sharing of one model between keys, with the gateway's admission on and off.

    .venv/bin/python benchmarks/fairness.py [--duration 20] [--token-rate 40] [--max-tokens 64] [--workers 2]

The simulator serves one model with --max-num-seqs 8, at a token rate like a real model's. Key A
keeps 64 streams open; keys B, C and D each send one stream at a time. Printed: the time to first
token (p50, p99) of B, C and D alone and beside A, with admission on and off; then, with four greedy
keys (16 streams each), each key's share of the completed tokens (Jain's fairness index) and the
total tokens per second, admission on and off. Figures and ratios come from this one run. With
--workers N the gateway runs N workers sharing a redis-server the script starts (admission/shared.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from servers import REPO, Child, free_port, gateway_env, log, spawn, wait_for_port
from targets import print_targets

MAX_NUM_SEQS = 8
FLOOD = 64
GREEDY = 16


@dataclass
class KeyLoad:
    """What one key's clients measured."""

    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0


async def one_stream(client: httpx.AsyncClient, key: str, max_tokens: int, load: KeyLoad) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        if response.status_code != 200:
            await response.aread()
            load.errors += 1
            return
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content":""' not in line:
                if first is None:
                    first = time.perf_counter() - started
                load.tokens += 1
    if first is not None:
        load.ttfts.append(first)


async def client_loop(base_url: str, key: str, streams: int, max_tokens: int, until: float, load: KeyLoad) -> None:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while time.monotonic() < until:
                await one_stream(client, key, max_tokens, load)

        await asyncio.gather(*(worker() for _ in range(streams)))


async def most_waiting_in_engine(engine_url: str, until: float) -> int:
    """The most requests the simulator's engine had waiting for a sequence, sampled every 0.2 s: what
    the gateway let through beyond the engine's max_num_seqs."""
    most = 0
    async with httpx.AsyncClient(base_url=engine_url, timeout=5) as client:
        while time.monotonic() < until:
            most = max(most, int((await client.get("/_simulator/stats")).json()["waiting"]))
            await asyncio.sleep(0.2)
    return most


def run_load(
    stack: Stack, plan: dict[str, tuple[str, int]], max_tokens: int, duration: float
) -> tuple[dict[str, KeyLoad], float, int]:
    """plan: key name -> (key, streams at once). Returns what each key measured, the seconds it took,
    and the most requests waiting in the engine meanwhile."""
    loads = {name: KeyLoad() for name in plan}
    until = time.monotonic() + duration

    async def main() -> int:
        most, *_ = await asyncio.gather(
            most_waiting_in_engine(stack.sim_url, until),
            *(
                client_loop(stack.url, key, streams, max_tokens, until, loads[name])
                for name, (key, streams) in plan.items()
            ),
        )
        return int(most)

    started = time.monotonic()
    most = asyncio.run(main())
    return loads, time.monotonic() - started, most


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else float("nan")


class Stack:
    """The simulator and a gateway in front of it, with keys A-D."""

    def __init__(self, work: Path, python: str, token_rate: float, admission: bool, workers: int) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        shared: dict[str, str] = {}
        if workers > 1:
            shared = {"GATEWAY_WORKERS": str(workers), "GATEWAY_RATE_LIMIT_STORAGE": self.start_redis(work)}
        sim_port = free_port()
        sim = spawn(
            "simulator",
            [
                python,
                "-m",
                "vllm_simulator",
                "--port",
                str(sim_port),
                "--served-model-name",
                "m",
                "--max-num-seqs",
                str(MAX_NUM_SEQS),
                "--token-rate",
                str(token_rate),
            ],
            work / "simulator.log",
            None,
            cwd=REPO,
        )
        self.children.append(sim)
        wait_for_port(sim_port, sim.proc, "simulator", sim.log_path)
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        config = work / "models.sh"
        config.write_text(
            f"vllm_model name=m path=/bench url=http://127.0.0.1:{sim_port} max_num_seqs={MAX_NUM_SEQS}\n"
        )
        keys = work / "keys.json"
        if keys.exists():
            keys.unlink()
        port = free_port()
        env = gateway_env(work, port, config, {"GATEWAY_ADMISSION": "true" if admission else "false", **shared})
        self.keys: dict[str, str] = {}
        for name in "ABCD":
            argv = [python, str(REPO / "vllm_api_server.py"), "keys", "create", "--name", name, "--json"]
            done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
            self.keys[name] = json.loads(done.stdout)["key"]
        gateway = spawn(
            "gateway",
            [python, str(REPO / "vllm_api_server.py"), "serve"],
            work / "gateway.log",
            None,
            env=env,
            cwd=REPO,
        )
        self.children.append(gateway)
        wait_for_port(port, gateway.proc, "gateway", gateway.log_path, timeout=60)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while httpx.get(self.url + "/health", timeout=5).json().get("status") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway never found the simulator ready")
            time.sleep(0.2)

    def start_redis(self, work: Path) -> str:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is missing (scripts/install_test_deps.sh installs it)")
        port = free_port()
        argv = [server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(work)]
        redis = spawn("redis", argv, work / "redis.log", None)
        self.children.append(redis)
        wait_for_port(port, redis.proc, "redis", redis.log_path)
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load (default 20)")
    parser.add_argument("--token-rate", type=float, default=40.0, help="tokens/s per sequence (default 40)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="gateway workers (more than 1: with Redis)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "fairness")
    args = parser.parse_args()
    sequence_s = args.max_tokens / args.token_rate

    ttft: dict[tuple[bool, bool], list[float]] = {}
    engine_waiting: dict[tuple[bool, bool], int] = {}
    greedy: dict[bool, tuple[list[int], float]] = {}
    for admission in (True, False):
        stack = Stack(args.work / ("on" if admission else "off"), args.python, args.token_rate, admission, args.workers)
        try:
            for flood in (False, True):
                plan = {name: (stack.keys[name], 1) for name in "BCD"}
                if flood:
                    plan["A"] = (stack.keys["A"], FLOOD)
                log(f"admission {'on' if admission else 'off'}: B, C, D{' beside A' if flood else ' alone'}")
                loads, _, most = run_load(stack, plan, args.max_tokens, args.duration)
                ttft[(admission, flood)] = [t for name in "BCD" for t in loads[name].ttfts]
                engine_waiting[(admission, flood)] = most
            log(f"admission {'on' if admission else 'off'}: four greedy keys")
            everyone = {name: (stack.keys[name], GREEDY) for name in "ABCD"}
            loads, elapsed, _ = run_load(stack, everyone, args.max_tokens, args.duration)
            greedy[admission] = (
                [loads[name].tokens for name in "ABCD"],
                sum(loads[n].tokens for n in "ABCD") / elapsed,
            )
        finally:
            stack.stop()

    print(
        f"\nOne model, --max-num-seqs {MAX_NUM_SEQS}, {args.token_rate:g} tokens/s per sequence, "
        f"{args.max_tokens} tokens per stream ({sequence_s:.2f} s), {args.duration:g} s per load, "
        f"{args.workers} gateway worker{'s' if args.workers > 1 else ''}\n"
    )
    print("TTFT of keys B, C, D (one stream at a time each), ms")
    print(f"  {'':<28}{'p50':>9}{'p99':>9}{'streams':>9}{'engine waiting max':>20}")
    for admission in (True, False):
        for flood in (False, True):
            values = ttft[(admission, flood)]
            label = f"admission {'on' if admission else 'off'}, {'beside A (64)' if flood else 'alone'}"
            print(
                f"  {label:<28}{percentile(values, 50) * 1000:>9.0f}{percentile(values, 99) * 1000:>9.0f}"
                f"{len(values):>9}{engine_waiting[(admission, flood)]:>20}"
            )
    print("\nFour greedy keys (16 streams each): completed tokens per key")
    for admission in (True, False):
        tokens, rate = greedy[admission]
        print(
            f"  admission {'on ' if admission else 'off'}  A/B/C/D {'/'.join(map(str, tokens))}  "
            f"Jain {jain([float(t) for t in tokens]):.3f}  total {rate:.0f} tokens/s"
        )

    alone_p99 = percentile(ttft[(True, False)], 99)
    flood_p99 = percentile(ttft[(True, True)], 99)
    limit = 1.5 * alone_p99 + sequence_s
    checks = [
        ("TTFT p99 beside the flood <= 1.5 x alone + one sequence (admission on)", flood_p99, "<=", limit, "s"),
        ("Jain's index, four greedy keys (admission on)", jain([float(t) for t in greedy[True][0]]), ">=", 0.95, ""),
        ("requests waiting in the engine beside the flood (admission on)", engine_waiting[(True, True)], "<=", 0, ""),
        ("total tokens/s, admission on vs off", greedy[True][1] / greedy[False][1], ">=", 0.98, "x"),
    ]
    return print_targets(checks)


if __name__ == "__main__":
    sys.exit(main())
