"""Admission through real vLLM: output tokens/s through the gateway against vLLM directly, and vLLM's queue.

    .venv/bin/python benchmarks/admission_vllm.py [--duration 20] [--rounds 3] [--clients 8,16]
        [--max-tokens 256] [--targets direct,gateway,gateway-off] [--keepalive] [--gateway-cpu 0 --load-cpus 1]

One real vLLM CPU server (.venv-vllm) serves the tiny model (tests/support/tiny_model.py) with
--max-num-seqs 8. The gateway in front of it has max_num_seqs=8 in its model config, so admission
keeps 8 requests in flight to it and queues the rest; `gateway-off` is a second gateway, the same but
with GATEWAY_ADMISSION=false. For each number of clients the targets take turns (the order reverses
every round): each client sends one streamed chat completion after another (max_tokens with
ignore_eos, so each runs to its length) for a fixed window, and the output tokens that arrive within
the window are counted (vLLM's continuous usage stats: every event carries the count so far). All the
while vLLM's /metrics is sampled for vllm:num_requests_waiting. Printed: the median tokens/s per
target, its ratio to direct, the most requests vLLM had waiting, the CPU each process used, and the
targets. On two cores the gateway and the clients compete with vLLM for CPU (and so does anything else
running on the machine: the `other` column); --gateway-cpu and --load-cpus pin them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import procstat
from bench import cpu_list
from servers import REPO, free_port, log, start_gateway
from targets import print_targets
from vllm_e2e import SERVED_NAME, pin_tree, wait_for_model

sys.path.insert(0, str(REPO))
from tests.support.processes import parse_metrics
from tests.support.real_vllm import VLLM_ARGS, start_real_vllm, tiny_model_dir, vllm_python

MAX_NUM_SEQS = int(VLLM_ARGS[VLLM_ARGS.index("--max-num-seqs") + 1])
TARGETS = ("direct", "gateway", "gateway-off")
COMPLETION_TOKENS = re.compile(rb'"completion_tokens":(\d+)')
SAMPLE_EVERY = 0.2  # seconds between reads of vLLM's /metrics


@dataclass
class Run:
    """What one window of load measured."""

    seconds: float = 0.0
    tokens: int = 0  # output tokens that arrived within the window
    streams: int = 0  # streams that ended within it
    short: int = 0  # of those, streams with fewer than max_tokens tokens
    errors: int = 0
    max_waiting: float = 0.0  # vllm:num_requests_waiting, the most seen
    max_running: float = 0.0
    samples: int = 0  # reads of vLLM's /metrics within the window
    ttfts: list[float] = field(default_factory=list)  # of the streams that ended within the window
    # (time, vllm:generation_tokens_total) at the first and the last read
    generated: list[tuple[float, float]] = field(default_factory=list)
    cpu: dict[str, float] | None = None  # seconds of CPU per process over the window

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def vllm_tokens_per_s(self) -> float:
        """vLLM's own count, a check on the clients': from the first read of /metrics to the last."""
        if len(self.generated) < 2 or self.generated[1][0] <= self.generated[0][0]:
            return 0.0
        (start, first), (end, last) = self.generated
        return (last - first) / (end - start)


def completion_tokens(line: bytes) -> int | None:
    """The count of output tokens so far in one streamed event, from its usage; None without usage."""
    found = COMPLETION_TOKENS.search(line)
    return int(found.group(1)) if found else None


async def failed(run: Run, what: str) -> None:
    # Counted, not fatal: a failure is a figure of the target (and a FAIL through the gateway).
    log(f"a stream failed: {what}")
    run.errors += 1
    await asyncio.sleep(0.1)  # a failure comes at once: do not spin on it


async def one_stream(client: httpx.AsyncClient, body: dict, run: Run) -> None:
    so_far, started, first = 0, time.monotonic(), None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await failed(run, f"status {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                count = completion_tokens(line.encode())
                if count is not None and count > so_far:
                    # Counted as it arrives, so a stream cut at the window's end counts what came before.
                    first = first or time.monotonic()
                    run.tokens += count - so_far
                    so_far = count
    except httpx.TransportError as error:
        await failed(run, repr(error))
        return
    run.streams += 1
    run.short += so_far < body["max_tokens"]
    run.ttfts.append((first or time.monotonic()) - started)


async def sample_vllm(metrics_url: str, run: Run) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            values = parse_metrics((await client.get(metrics_url)).text)
            run.max_waiting = max(run.max_waiting, values.get("vllm:num_requests_waiting", 0.0))
            run.max_running = max(run.max_running, values.get("vllm:num_requests_running", 0.0))
            run.samples += 1
            reading = (time.monotonic(), values.get("vllm:generation_tokens_total", 0.0))
            run.generated = [run.generated[0] if run.generated else reading, reading]
            await asyncio.sleep(SAMPLE_EVERY)


async def load_window(
    base_url: str,
    key: str | None,
    clients: int,
    options: argparse.Namespace,
    metrics_url: str,
    run: Run,
) -> None:
    body = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "Tell me a story about the sea."}],
        "max_tokens": options.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # A new connection for every stream, by default: reusing httpx's kept-alive connections straight to
    # vLLM gave first tokens seconds late now and then (not through the gateway, which keeps its own),
    # which flattered the gateway. --keepalive measures that way.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients if options.keepalive else 0)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while True:
                await one_stream(client, body, run)

        tasks = [asyncio.create_task(worker()) for _ in range(clients)]
        tasks.append(asyncio.create_task(sample_vllm(metrics_url, run)))
        started = time.monotonic()
        await asyncio.sleep(options.duration)
        run.seconds = time.monotonic() - started
        # Closing the streams aborts their requests in vLLM (and, through the gateway, its waiting ones).
        for task in tasks:
            task.cancel()
        for ending in await asyncio.gather(*tasks, return_exceptions=True):
            if not isinstance(ending, asyncio.CancelledError):
                raise RuntimeError(f"a client or the /metrics sampler failed: {ending!r}") from ending


def wait_until_idle(metrics_url: str, timeout: float = 60.0) -> None:
    """Wait until vLLM has nothing running or waiting, so a window starts from an idle server."""
    deadline = time.monotonic() + timeout
    while True:
        values = parse_metrics(httpx.get(metrics_url, timeout=10).text)
        if values.get("vllm:num_requests_running", 0) + values.get("vllm:num_requests_waiting", 0) == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM still busy {timeout:.0f} s after the load stopped")
        time.sleep(0.2)


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process tree, and of this process (the clients) alone."""
    return {"clients": time.process_time(), **{name: procstat.cpu_seconds(pid) for name, pid in pids.items()}}


def measure(
    base_url: str, key: str | None, clients: int, options: argparse.Namespace, metrics_url: str, pids: dict[str, int]
) -> Run:
    wait_until_idle(metrics_url)
    run = Run()
    before, cores_before = cpu_now(pids), procstat.core_times()
    asyncio.run(load_window(base_url, key, clients, options, metrics_url, run))
    run.cpu = {name: seconds - before[name] for name, seconds in cpu_now(pids).items()}
    # What the machine's other tenants took meanwhile: on two cores it moves every figure.
    busy = procstat.core_times().busy
    machine = sum(busy[core] - cores_before.busy[core] for core in busy) / os.sysconf("SC_CLK_TCK")
    run.cpu["other"] = max(0.0, machine - sum(run.cpu.values()))
    return run


@dataclass
class Stack:
    """vLLM and the gateways in front of it: target name -> (base URL, key)."""

    urls: dict[str, tuple[str, str | None]]
    metrics_url: str
    pids: dict[str, int]  # process trees whose CPU is counted: vLLM and each gateway
    stop: Callable[[], None]


def start_stack(work: Path, options: argparse.Namespace) -> Stack:
    python = vllm_python()
    if not Path(python).exists():
        raise RuntimeError(f"no vLLM interpreter at {python}: create .venv-vllm (see README) or set VLLM_PYTHON")
    work.mkdir(parents=True, exist_ok=True)
    load_cpus = ",".join(map(str, options.load_cpus or []))
    if load_cpus:
        # As in vllm_e2e.py: vLLM binds its compute threads itself, so tell it the cores, then pin the rest.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = load_cpus
        os.sched_setaffinity(0, options.load_cpus)  # the clients, this process, beside vLLM
    log("making the tiny model (once) and starting a real vLLM CPU server (70-90 s on two cores)")
    model_dir = tiny_model_dir()
    server = start_real_vllm(free_port(), SERVED_NAME, model_dir, work / "vllm.log")
    gateways = []
    try:
        if load_cpus:
            pin_tree(server.handle.tree(), load_cpus)
        urls: dict[str, tuple[str, str | None]] = {"direct": (server.base_url, None)}
        pids = {"vllm": server.handle.pid}
        for target in options.targets:
            if target == "direct":
                continue
            # Both gateways know the capacity, so only GATEWAY_ADMISSION tells them apart.
            overrides = {"GATEWAY_ADMISSION": "false" if target == "gateway-off" else "true"}
            log(f"vLLM ready after {server.startup_seconds:.0f} s; starting {target}")
            gateway = start_gateway(
                work / target,
                sys.executable,
                {SERVED_NAME: server.base_url},
                cpu=options.gateway_cpu,
                model_path=model_dir,
                overrides=overrides,
                max_num_seqs=MAX_NUM_SEQS,
            )
            gateways.append(gateway)
            wait_for_model(gateway)
            urls[target] = (gateway.base_url, gateway.key)
            pids[target] = gateway.child.pid
    except BaseException:
        for gateway in gateways:
            gateway.child.stop()
        server.stop()
        raise

    def stop() -> None:
        for gateway in gateways:
            gateway.child.stop()
        server.stop()

    return Stack(urls, server.base_url + "/metrics", pids, stop)


def run_rounds(stack: Stack, options: argparse.Namespace) -> dict[tuple[int, str], list[Run]]:
    runs: dict[tuple[int, str], list[Run]] = {(c, t): [] for c in options.clients for t in options.targets}
    for clients in options.clients:
        for number in range(options.rounds):
            # Reverse the order every round, so drift (and the other tenants of the machine) favour no target.
            order = options.targets if number % 2 == 0 else options.targets[::-1]
            for target in order:
                log(f"{clients} clients, round {number + 1}/{options.rounds}: {target}")
                url, key = stack.urls[target]
                run = measure(url, key, clients, options, stack.metrics_url, stack.pids)
                log(f"  {run.tokens_per_s:.1f} tokens/s, vLLM waiting at most {run.max_waiting:.0f}")
                runs[(clients, target)].append(run)
    return runs


def cpu_pct(runs: list[Run], name: str) -> str:
    """Median CPU of one process tree over the windows, in % of one core."""
    values = [100 * r.cpu[name] / r.seconds for r in runs if r.cpu and name in r.cpu]
    return f"{statistics.median(values):.0f}" if values else "-"


COLUMNS = (
    ("tok/s p50", 10),
    ("min", 8),
    ("max", 8),
    ("vs direct", 10),
    ("paired", 8),
    ("vLLM count", 11),
    ("TTFT p50 ms", 12),
    ("max", 7),
    ("streams", 8),
    ("short", 6),
    ("errors", 7),
    ("vLLM waiting max", 17),
    ("running max", 12),
    ("CPU % vLLM", 11),
    ("gateway", 8),
    ("clients", 8),
    ("other", 6),
)


def paired_ratio(done: list[Run], direct: list[Run]) -> float:
    """The median over rounds of each round's ratio to direct: the runs of a round are next to each other,
    so drift in the machine's speed (other tenants) cancels better than between the medians."""
    return statistics.median(r.tokens_per_s / d.tokens_per_s for r, d in zip(done, direct, strict=True))


def row(target: str, done: list[Run], direct: list[Run] | None) -> list[str]:
    """One target's figures over its rounds, in the order of COLUMNS."""
    rates = [r.tokens_per_s for r in done]
    ttfts = [t for r in done for t in r.ttfts] or [float("nan")]
    median = statistics.median(rates)
    versus = direct and target != "direct"
    return [
        f"{median:.1f}",
        f"{min(rates):.1f}",
        f"{max(rates):.1f}",
        f"{median / statistics.median(d.tokens_per_s for d in direct):.3f}" if versus else "-",
        f"{paired_ratio(done, direct):.3f}" if versus else "-",
        f"{statistics.median(r.vllm_tokens_per_s for r in done):.1f}",
        f"{1000 * statistics.median(ttfts):.0f}",
        f"{1000 * max(ttfts):.0f}",
        str(sum(r.streams for r in done)),
        str(sum(r.short for r in done)),
        str(sum(r.errors for r in done)),
        f"{max(r.max_waiting for r in done):.0f}",
        f"{max(r.max_running for r in done):.0f}",
        cpu_pct(done, "vllm"),
        cpu_pct(done, target) if target != "direct" else "-",
        cpu_pct(done, "clients"),
        cpu_pct(done, "other"),
    ]


def report(runs: dict[tuple[int, str], list[Run]], options: argparse.Namespace) -> int:
    connections = "kept-alive connections" if options.keepalive else "a new connection per stream"
    pinning = (
        f"gateway on core {options.gateway_cpu}, vLLM and clients on {options.load_cpus}"
        if options.load_cpus
        else "nothing pinned: the gateway, the clients and other tenants compete with vLLM for them"
    )
    print(
        f"\nOne vLLM CPU server (tiny model, --max-num-seqs {MAX_NUM_SEQS}), the gateway with max_num_seqs="
        f"{MAX_NUM_SEQS}; streams of {options.max_tokens} tokens (ignore_eos), {options.duration:g} s windows, "
        f"{options.rounds} rounds, {connections}; {os.cpu_count()} cores, {pinning}\n"
    )
    head = f"{'clients':>7}  {'target':<12}" + "".join(f"{name:>{width}}" for name, width in COLUMNS)
    print(head)
    print("-" * len(head))
    medians = {where: statistics.median(r.tokens_per_s for r in done) for where, done in runs.items()}
    for (clients, target), done in runs.items():
        cells = row(target, done, runs.get((clients, "direct")))
        print(f"{clients:>7}  {target:<12}" + "".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    print(
        "\ntok/s: output tokens the clients received per second of window; vs direct: the ratio of the medians; "
        "paired: the median of each round's ratio; vLLM count: the same from vLLM's "
        "vllm:generation_tokens_total; CPU: % of one core over the window (other: every other process "
        "on the machine)"
    )
    return targets(runs, medians, options)


def targets(
    runs: dict[tuple[int, str], list[Run]], medians: dict[tuple[int, str], float], options: argparse.Namespace
) -> int:
    checks = []
    for clients in options.clients:
        if (clients, "gateway") not in runs or (clients, "direct") not in runs:
            continue
        ratio = medians[(clients, "gateway")] / medians[(clients, "direct")]
        waiting = max(r.max_waiting for r in runs[(clients, "gateway")])
        errors = sum(r.errors + r.short for r in runs[(clients, "gateway")])
        checks.append((f"output tokens/s, gateway (admission on) vs direct, {clients} clients", ratio, ">=", 0.98, "x"))
        checks.append((f"vllm:num_requests_waiting max through the gateway, {clients} clients", waiting, "<=", 0, ""))
        checks.append((f"errors and streams cut short through the gateway, {clients} clients", errors, "<=", 0, ""))
    return print_targets(checks)


def warm_up(stack: Stack, options: argparse.Namespace) -> None:
    """One short window straight at vLLM: its first requests are slower than the rest."""
    log("warming vLLM up")
    quick = argparse.Namespace(**{**vars(options), "duration": min(5.0, options.duration)})
    measure(stack.urls["direct"][0], None, max(options.clients), quick, stack.metrics_url, {})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per window (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="windows per target and clients (default 3)")
    parser.add_argument(
        "--clients",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[MAX_NUM_SEQS, 2 * MAX_NUM_SEQS],
        help=f"numbers of concurrent streaming clients (default {MAX_NUM_SEQS},{2 * MAX_NUM_SEQS})",
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="output tokens per stream (default 256)")
    parser.add_argument(
        "--targets",
        type=lambda text: text.split(","),
        default=["direct", "gateway"],
        help=f"comma-separated subset of {','.join(TARGETS)} (default direct,gateway)",
    )
    parser.add_argument("--keepalive", action="store_true", help="clients reuse connections (default: one each)")
    parser.add_argument("--gateway-cpu", type=int, default=None, help="pin the gateways to this core")
    parser.add_argument("--load-cpus", type=cpu_list, default=None, help="pin vLLM and the clients, e.g. 1")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "admission-vllm")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown or "direct" not in args.targets:
        parser.error(f"--targets: direct and some of {', '.join(TARGETS[1:])} (not {', '.join(sorted(unknown))})")
    return args


def main() -> int:
    options = parse_args()
    stack = start_stack(options.work, options)
    try:
        warm_up(stack, options)
        runs = run_rounds(stack, options)
    finally:
        stack.stop()
    return report(runs, options)


if __name__ == "__main__":
    sys.exit(main())
