"""The gateway benchmark: the gateway, nginx as a reverse proxy and the bare backend, side by side in one run.

Backends are nginx serving canned vLLM-shaped answers; load comes from wrk; the proxy under test sits alone on
one core and the load on another, so every figure is per proxy core. Run it through benchmarks/run.sh.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import procstat
import report
from canned import VARIANTS, CannedFiles, Variant, write_canned
from loadgen import Load, Measured, run_wrk
from servers import REPO, Child, log, start_backend, start_gateway, start_pipe, start_proxy, wait_until_serving
from vllm_e2e import VllmOptions, run_vllm

HERE = Path(__file__).resolve().parent
SCENARIOS = ("json", "stream", "paced", "leak", "vllm")
TARGETS = ("direct", "nginx", "pipe", "gateway", "gateway-bare")
# The gateway with what it keeps beside each request turned off, to measure what that costs.
BARE_GATEWAY = {"GATEWAY_USAGE_LEDGER": "false", "GATEWAY_METRICS": "false"}
VARIANT = {v.name: v for v in VARIANTS}
# Seconds wrk waits for one response before counting a timeout, per kind of request.
TIMEOUTS = {"json": 10, "stream": 20, "paced": 60}


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def cpu_list(text: str) -> list[int]:
    """taskset's list syntax: "1", "1-3", "1,3"."""
    cpus = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def name_list(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(unknown)} (choose from {', '.join(allowed)})")
        return names

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.sh",
        description=__doc__.splitlines()[0],
        epilog="Results: benchmarks/results/latest.json, latest.txt and throughput.png "
        "(--quick: benchmarks/work/quick/).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run: 3 s per scenario, 20k-request leak check, no real vLLM"
    )
    parser.add_argument(
        "--scenarios",
        type=name_list(SCENARIOS),
        default=None,
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all; --quick: all but vllm)",
    )
    parser.add_argument(
        "--targets",
        type=name_list(TARGETS),
        default=list(TARGETS),
        help="comma-separated subset of direct,nginx,pipe,gateway,gateway-bare "
        "(default: all; pipe is benchmarks/python_pipe.py, the floor for a Python relay; gateway-bare is the "
        "gateway with its usage ledger and metrics off)",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per load run (default 10; --quick 3)")
    parser.add_argument(
        "--paced-duration",
        type=float,
        default=None,
        help="seconds per paced-stream run, a dozen ~1 s streams per connection (default 15; --quick 6)",
    )
    parser.add_argument(
        "--json-concurrency",
        type=int_list,
        default=[1, 32],
        help="connections for non-streamed requests (default 1,32)",
    )
    parser.add_argument(
        "--stream-concurrency", type=int_list, default=[32], help="connections for whole streams (default 32)"
    )
    parser.add_argument(
        "--paced-concurrency",
        type=int_list,
        default=[256, 1024],
        help="connections for paced ~1 s streams (default 256,1024)",
    )
    parser.add_argument(
        "--leak-requests", type=int, default=None, help="requests in the leak check (default 1000000; --quick 20000)"
    )
    parser.add_argument(
        "--leak-checkpoint",
        type=int,
        default=10_000,
        help="RSS is compared with the RSS after this many requests (default 10000)",
    )
    parser.add_argument("--vllm-prompts", type=int, default=64, help="prompts per real-vLLM run (default 64)")
    parser.add_argument("--vllm-concurrency", type=int, default=8, help="concurrent real-vLLM requests (default 8)")
    parser.add_argument(
        "--vllm-rounds", type=int, default=2, help="direct/gateway runs each, in alternating order (default 2)"
    )
    parser.add_argument("--vllm-input-len", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--vllm-output-len", type=int, default=128, help="output tokens (default 128)")
    parser.add_argument("--gateway-cpu", type=int, default=0, help="core of the proxy under test (default 0)")
    parser.add_argument(
        "--load-cpus",
        type=cpu_list,
        default=[1],
        help="cores of wrk (one thread each) and the backend (one worker each), e.g. 1-3 (default 1)",
    )
    parser.add_argument("--python", default=None, help="interpreter of the gateway (default: .venv/bin/python)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--work", type=Path, default=HERE / "work", help="scratch directory (default benchmarks/work)")
    args = parser.parse_args(argv)
    if args.scenarios is None:
        args.scenarios = [s for s in SCENARIOS if not (args.quick and s == "vllm")]
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.paced_duration = args.paced_duration or (6.0 if args.quick else 15.0)
    args.leak_requests = args.leak_requests or (20_000 if args.quick else 1_000_000)
    args.out = args.out or (args.work / "quick" if args.quick else HERE / "results")
    venv_python = REPO / ".venv" / "bin" / "python"
    args.python = args.python or str(venv_python if venv_python.exists() else sys.executable)
    return args


@dataclass
class Target:
    name: str
    url_of: Callable[[Variant], str]  # base URL serving that variant
    key: str | None
    pid: int | None  # the process whose CPU and memory are measured (None: nothing between wrk and backend)
    idle_rss_kb: int | None = None


@dataclass(frozen=True)
class Bench:
    """What every step of one run needs: the options and the canned files."""

    args: argparse.Namespace
    files: CannedFiles

    def load(
        self, target: Target, variant: Variant, connections: int, duration: float, bodies: list[Path] | None = None
    ) -> Measured:
        load = Load(
            url=target.url_of(variant),
            bodies=bodies or [self.files.body(variant)],
            key=target.key,
            connections=connections,
            duration=duration,
            timeout=TIMEOUTS[variant.name],
            cpus=self.args.load_cpus,
        )
        return run_wrk(load, target.pid)


def measure(bench: Bench, target: Target, kind: str, connections: int) -> dict:
    args, variant = bench.args, VARIANT[kind]
    m = bench.load(target, variant, connections, args.paced_duration if variant.paced else args.duration)
    events = m.requests * bench.files.events_per_stream if variant.stream else None
    row = {
        "kind": kind,
        "target": target.name,
        "connections": connections,
        "requests": m.requests,
        "seconds": round(m.seconds, 3),
        "rps": m.rps,
        "latency_ms": {k.removesuffix("_us"): v / 1000 for k, v in m.latency_us.items()},
        "errors": m.errors,
        "error_count": m.error_count,
        "events": events,
        "proxy_core_busy_pct": round(100 * m.core_busy.get(args.gateway_cpu, 0.0), 1),
        "load_core_busy_pct": round(
            100 * sum(m.core_busy.get(c, 0.0) for c in args.load_cpus) / len(args.load_cpus), 1
        ),
        "cpu_seconds": m.cpu_seconds,
        "cpu_us_per_request": None,
        "cpu_us_per_event": None,
        "rss_idle_mb": None,
        "rss_peak_mb": None,
        "rss_kb_per_stream": None,
    }
    if m.cpu_seconds is not None and m.requests:
        row["cpu_us_per_request"] = m.cpu_seconds / m.requests * 1e6
        if events:
            row["cpu_us_per_event"] = m.cpu_seconds / events * 1e6
    if m.rss_peak_kb is not None:
        row["rss_idle_mb"] = (target.idle_rss_kb or 0) / 1024
        row["rss_peak_mb"] = m.rss_peak_kb / 1024
        if kind == "paced" and target.idle_rss_kb is not None:
            row["rss_kb_per_stream"] = (m.rss_peak_kb - target.idle_rss_kb) / connections
    log(
        f"{kind:6} c={connections:<5} {target.name:8} {m.rps:9.0f} req/s  p50 {row['latency_ms']['p50']:8.2f} ms  "
        f"p99 {row['latency_ms']['p99']:8.2f} ms  errors {m.error_count}"
    )
    return row


def settle(children: list[Child], timeout: float = 60.0) -> None:
    """Wait until the processes under test are idle, so work left from the last run (streams that wrk cut
    off, closing sockets) is not billed to the next one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(procstat.cpu_seconds(c.pid) for c in children)
        time.sleep(0.5)
        if sum(procstat.cpu_seconds(c.pid) for c in children) - before < 0.03:
            return
    log(f"warning: the processes under test were still busy after {timeout:.0f} s of waiting")


def warm_up(bench: Bench, target: Target) -> None:
    seconds = 1.0 if bench.args.quick else 3.0
    for kind in ("json", "stream"):
        bench.load(target, VARIANT[kind], 32, seconds)


def leak_check(bench: Bench, target: Target) -> dict:
    """RSS after the first ~10k requests and after many more: nine non-streamed requests to one whole stream."""
    args = bench.args
    bodies = [bench.files.body(VARIANT["json"])] * 9 + [bench.files.body(VARIANT["stream"])]
    checkpoints, total, rate = [], 0, 0.0
    chunk = 3.0 if args.quick else 30.0
    log(f"leak check: {args.leak_requests:,} requests through the gateway")
    while total < args.leak_requests:
        goal = args.leak_checkpoint if total < args.leak_checkpoint else args.leak_requests
        seconds = 2.0 if not rate else min(chunk, max(1.0, (goal - total) / rate * 1.05))
        m = bench.load(target, VARIANT["json"], 32, seconds, bodies=bodies)
        if m.error_count:
            raise RuntimeError(f"leak check: {m.errors} errors after {total:,} requests")
        if not m.requests:
            raise RuntimeError(
                f"leak check: the gateway completed no request in {seconds:.0f} s after {total:,} requests"
            )
        total += m.requests
        rate = m.rps
        time.sleep(0.5)  # let in-flight work settle before reading RSS
        checkpoints.append({"requests": total, "rss_kb": procstat.rss_kb(target.pid)})
        log(f"leak check: {total:,} requests, RSS {checkpoints[-1]['rss_kb'] / 1024:.1f} MB")
    first = next((c for c in checkpoints if c["requests"] >= args.leak_checkpoint), checkpoints[0])
    return {
        "mix": "9 non-streamed : 1 whole stream, 32 connections",
        "checkpoint": args.leak_checkpoint,
        "checkpoints": checkpoints,
        "first_requests": first["requests"],
        "rss_first_kb": first["rss_kb"],
        "total_requests": total,
        "rss_last_kb": checkpoints[-1]["rss_kb"],
    }


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else ""


def meta(bench: Bench) -> dict:
    args = bench.args
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit or None,
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        # The whole version line names the build (date, compiler): a build without PGO and LTO (pyenv's
        # default) runs the gateway about a third slower than a distribution's Python (README).
        "python": tool_version([args.python, "-c", "import sys; print(sys.version.replace(chr(10), ' '))"]),
        "nginx": tool_version(["nginx", "-v"]),
        "wrk": tool_version(["wrk", "-v"]).split("Copyright")[0].strip(),
        "proxy_core": args.gateway_cpu,
        "load_cores": args.load_cpus,
        "duration_s": args.duration,
        "events_per_stream": bench.files.events_per_stream,
        "quick": args.quick,
        "scenarios": args.scenarios,
        "targets": args.targets,
    }


def run_canned(bench: Bench, results: dict) -> None:
    args, files = bench.args, bench.files
    children: list[Child] = []
    try:
        backend = start_backend(args.work, files, args.load_cpus)
        children.append(backend.child)
        wait_until_serving("nginx backend", backend.url, files, None, backend.child.proc, 10)
        targets = []
        if "direct" in args.targets:
            targets.append(Target("direct", backend.url, None, None))
        if "nginx" in args.targets:
            proxy = start_proxy(args.work, backend, args.gateway_cpu)
            children.append(proxy.child)
            wait_until_serving("nginx proxy", proxy.url, files, None, proxy.child.proc, 10)
            targets.append(Target("nginx", proxy.url, None, proxy.child.pid))
        if "pipe" in args.targets:
            pipe = start_pipe(args.work, args.python, backend, args.gateway_cpu)
            children.append(pipe.child)
            wait_until_serving("python pipe", pipe.url, files, None, pipe.child.proc, 10)
            targets.append(Target("pipe", pipe.url, None, pipe.child.pid))
        if "gateway" in args.targets:
            routes = {v.model: backend.url(v) for v in VARIANTS}
            gateway = start_gateway(args.work / "gateway", args.python, routes, args.gateway_cpu)
            children.append(gateway.child)
            wait_until_serving("gateway", gateway.url, files, gateway.key, gateway.child.proc, 60)
            targets.append(Target("gateway", gateway.url, gateway.key, gateway.child.pid))
        if "gateway-bare" in args.targets:
            routes = {v.model: backend.url(v) for v in VARIANTS}
            work = args.work / "gateway-bare"
            bare = start_gateway(work, args.python, routes, args.gateway_cpu, overrides=BARE_GATEWAY)
            children.append(bare.child)
            wait_until_serving("gateway-bare", bare.url, files, bare.key, bare.child.proc, 60)
            targets.append(Target("gateway-bare", bare.url, bare.key, bare.child.pid))

        # Measured in the order --targets names them: the first of two alike can come out a few % apart.
        targets.sort(key=lambda target: args.targets.index(target.name))
        for target in targets:
            log(f"warming up {target.name}")
            warm_up(bench, target)
            settle(children)
            if target.pid:
                target.idle_rss_kb = procstat.rss_kb(target.pid)

        plan = [
            (kind, c)
            for kind, levels in (
                ("json", args.json_concurrency),
                ("stream", args.stream_concurrency),
                ("paced", args.paced_concurrency),
            )
            if kind in args.scenarios
            for c in levels
        ]
        for kind, connections in plan:
            for target in targets:
                settle(children)
                results["scenarios"].append(measure(bench, target, kind, connections))
                gone = [c.name for c in children if c.proc.poll() is not None]
                if gone:
                    raise RuntimeError(f"{', '.join(gone)} exited during {kind} c={connections}")

        gateway_target = next((t for t in targets if t.name == "gateway"), None)
        if "leak" in args.scenarios and gateway_target:
            settle(children)
            results["leak"] = leak_check(bench, gateway_target)
    finally:
        for child in reversed(children):
            child.stop()


def vllm_available() -> bool:
    python = os.environ.get("VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    return Path(python).exists()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # A plain SIGTERM would end the driver without its clean-up; make it unwind like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            log(f"{tool} is not installed; benchmarks/run.sh installs it")
            return 2
    for stale in ("nginx-backend", "nginx-proxy", "python-pipe", "gateway", "vllm"):
        shutil.rmtree(args.work / stale, ignore_errors=True)
    bench = Bench(args, write_canned(args.work / "canned"))
    results: dict = {"meta": meta(bench), "scenarios": [], "leak": None, "vllm": None, "targets": []}

    status = 0
    try:
        if set(args.scenarios) - {"vllm"}:
            run_canned(bench, results)
        if "vllm" in args.scenarios and not vllm_available():
            log("skipping the real-vLLM part: no .venv-vllm (create it as the README says, or set VLLM_PYTHON)")
            results["vllm"] = {"skipped": "no vLLM interpreter"}
        elif "vllm" in args.scenarios:
            options = VllmOptions(
                args.vllm_prompts,
                args.vllm_concurrency,
                args.vllm_input_len,
                args.vllm_output_len,
                args.vllm_rounds,
                args.gateway_cpu,
                args.load_cpus,
            )
            results["vllm"] = run_vllm(args.work / "vllm", args.python, options)
    except (RuntimeError, OSError, TimeoutError) as error:
        log(f"benchmark stopped: {error}")
        results["error"] = str(error)
        status = 1

    results["targets"] = report.evaluate(results["scenarios"], results["leak"], results["vllm"])
    summary = report.summary_text(results)
    # A broken run must not replace the results of the last good one.
    out = args.out if status == 0 else args.work / "failed"
    report.write_json(out / "latest.json", results)
    (out / "latest.txt").write_text(summary + "\n")
    if report.plot(out / "throughput.png", results["scenarios"]):
        log(f"plot: {out / 'throughput.png'}")
    log(f"results: {out / 'latest.json'}")
    print()
    print(summary)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
