"""The gateway benchmark: the gateway, nginx as a reverse proxy, vllm-router, the gateway of another revision
and the bare backend, side by side in one run.

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
from dataclasses import dataclass, field
from pathlib import Path

import baseline
import procstat
import report
from baseline import Checkout
from canned import VARIANTS, CannedFiles, Variant, write_canned
from loadgen import Load, Measured, run_wrk
from servers import (
    REPO,
    Child,
    PortPerVariant,
    answer_bytes,
    log,
    start_backend,
    start_gateway,
    start_pipe,
    start_proxy,
    start_vllm_router,
    wait_until_serving,
)
from targets import checks_text, print_targets
from vllm_e2e import VllmOptions, run_vllm

HERE = Path(__file__).resolve().parent
COMPARISON_TITLE = "Targets against the baseline, vllm-router and gateway-bare (ratios within this run)"
SCENARIOS = ("json", "stream", "paced", "leak", "vllm")
# What the gateway keeps beside each request, by the setting that turns it off.
FEATURES = {"metrics": "GATEWAY_METRICS", "ledger": "GATEWAY_USAGE_LEDGER", "admission": "GATEWAY_ADMISSION"}
# This revision's gateway as it ships (every feature on), with all of them off (bare), and with one off at a
# time: the differences are what each feature costs.
GATEWAYS = {
    "gateway": {},
    "gateway-bare": {setting: "false" for setting in FEATURES.values()},
    **{f"gateway-no-{feature}": {setting: "false"} for feature, setting in FEATURES.items()},
    # The request path as Python, not the build scripts/install.sh compiles with mypyc (docs/performance.md).
    "gateway-python": {"GATEWAY_COMPILED": "0"},
}
TARGETS = ("direct", "nginx", "pipe", "vllm-router", "baseline", *GATEWAYS)
DEFAULT_TARGETS = ["direct", "nginx", "pipe", "gateway", "gateway-bare"]
# Where benchmarks/run.sh installs vllm-router (its own virtualenv: it pins its own FastAPI and uvicorn).
VLLM_ROUTER = HERE / "work" / "vllm-router-venv" / "bin" / "vllm-router"
# The worktree of the baseline's revision, in the --work directory.
BASELINE_TREE = "baseline-tree"
VARIANT = {v.name: v for v in VARIANTS}
# Where each target's processes keep their files, under the --work directory.
TARGET_DIRS = ("nginx-proxy", "python-pipe", "vllm-router", "baseline", *GATEWAYS)
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


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
        default=None,
        help=f"comma-separated subset of {','.join(TARGETS)} (default: {','.join(DEFAULT_TARGETS)}, and baseline "
        "with --baseline). pipe is benchmarks/python_pipe.py, the floor for a Python relay; vllm-router is the "
        "Rust router from PyPI (run.sh installs it); baseline is the gateway of --baseline's revision; "
        "gateway-bare is the gateway with its metrics, usage ledger and admission off, gateway-no-X with X "
        "off alone (X: metrics, ledger, admission)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="a revision of this repository (a commit, a branch, a tag) whose gateway runs as the target "
        "baseline, from a git worktree under the --work directory, with the same interpreter",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=1,
        help="rounds of every scenario, each with the targets started afresh and taking turns (the order "
        "reversed every other round); the table shows each figure's median (default 1)",
    )
    parser.add_argument(
        "--vllm-router",
        default=str(VLLM_ROUTER),
        help="the vllm-router executable (default: the one run.sh installs under benchmarks/work/)",
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
    if args.targets is None:
        args.targets = DEFAULT_TARGETS + (["baseline"] if args.baseline else [])
    if "baseline" in args.targets and not args.baseline:
        parser.error("the target baseline needs --baseline REV")
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
    # The process whose CPU and memory are measured serving that variant (None: nothing between wrk and
    # the backend).
    pid_of: Callable[[Variant], int | None]
    label: str = ""  # how the report names it, when not by its name
    idle_rss_kb: dict[str, int] = field(default_factory=dict)  # per variant, after the warm-up

    @property
    def pid(self) -> int | None:
        """The process serving every variant (the gateway's); None when there is none or several."""
        pids = {self.pid_of(v) for v in VARIANTS}
        return pids.pop() if len(pids) == 1 else None


def one_process(pid: int | None) -> Callable[[Variant], int | None]:
    return lambda variant: pid


@dataclass(frozen=True)
class Bench:
    """What every step of one run needs: the options and the canned files."""

    args: argparse.Namespace
    files: CannedFiles
    # The bytes of one whole answer, per (target, kind): see streams_served.
    answer_sizes: dict[tuple[str, str], int] = field(default_factory=dict)

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
        return run_wrk(load, target.pid_of(variant))


def streams_served(bench: Bench, target: Target, variant: Variant, m: Measured) -> float:
    """The paced streams a run served, those wrk cut off at its end counted by the part they got.

    Every connection runs ~1.25 s streams back to back from the same start, so a run completes either
    7 or 8 streams per connection: completions alone jump by 14% on which side of the run's end the
    last stream fell, while the CPU measured includes the cut streams' work. The bytes read do not
    jump, so they are divided by those of one whole answer through the same target."""
    size = bench.answer_sizes.get((target.name, variant.name))
    if size is None:
        body = bench.files.body(variant).read_bytes()
        size = bench.answer_sizes[(target.name, variant.name)] = answer_bytes(target.url_of(variant), body, target.key)
    return m.bytes / size


def measure(bench: Bench, target: Target, kind: str, connections: int) -> dict:
    args, variant = bench.args, VARIANT[kind]
    m = bench.load(target, variant, connections, args.paced_duration if variant.paced else args.duration)
    # CPU is divided by what was served: for paced streams, whole ones and the part of the cut ones.
    served = streams_served(bench, target, variant, m) if variant.paced else float(m.requests)
    events = served * bench.files.events_per_stream if variant.stream else None
    # Every answer holds the canned response whole, so fewer bytes a request than that means a proxy cut
    # answers short (wrk counts those only when the framing breaks).
    bytes_per_request = m.bytes / m.requests if m.requests else None
    short = bytes_per_request is not None and bytes_per_request < bench.files.response(variant).stat().st_size
    row = {
        "kind": kind,
        "target": target.name,
        "label": target.label or target.name,
        "connections": connections,
        "requests": m.requests,
        "served": round(served, 1),
        "seconds": round(m.seconds, 3),
        "rps": m.rps,
        "bytes_per_request": bytes_per_request,
        "short_answers": short,
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
        "user_us_per_request": None,
        "cpu_us_per_event": None,
        "rss_idle_mb": None,
        "rss_peak_mb": None,
        "rss_kb_per_stream": None,
    }
    if m.cpu_seconds is not None and served:
        row["cpu_us_per_request"] = m.cpu_seconds / served * 1e6
        if m.cpu_user_seconds is not None:
            row["user_us_per_request"] = m.cpu_user_seconds / served * 1e6
        if events:
            row["cpu_us_per_event"] = m.cpu_seconds / events * 1e6
    idle_rss_kb = target.idle_rss_kb.get(variant.name)
    if m.rss_peak_kb is not None:
        row["rss_idle_mb"] = (idle_rss_kb or 0) / 1024
        row["rss_peak_mb"] = m.rss_peak_kb / 1024
        if kind == "paced" and idle_rss_kb is not None:
            row["rss_kb_per_stream"] = (m.rss_peak_kb - idle_rss_kb) / connections
    log(
        f"{kind:6} c={connections:<5} {row['label']:20} {m.rps:9.0f} req/s  p50 {row['latency_ms']['p50']:8.2f} ms  "
        f"p99 {row['latency_ms']['p99']:8.2f} ms  errors {m.error_count}"
    )
    if short:
        log(
            f"warning: {row['label']} answered {bytes_per_request:.0f} bytes a request on average, less than the "
            f"canned {kind} response alone"
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


def vllm_router_version(executable: str) -> str | None:
    """The installed vllm-router's version, from the metadata of the virtualenv it runs from."""
    python = Path(executable).parent / "python"
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-router'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip() or None


def meta(bench: Bench, checkout: Checkout | None) -> dict:
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
        "repeat": args.repeat,
        "baseline": ({"rev": args.baseline, "commit": checkout.commit, "short": checkout.short} if checkout else None),
        "vllm_router": vllm_router_version(args.vllm_router) if "vllm-router" in args.targets else None,
    }


def start_targets(
    bench: Bench, backend: PortPerVariant, children: list[Child], checkout: Checkout | None
) -> list[Target]:
    """Start the processes under test that --targets names, each checked to serve every variant whole."""
    args, files = bench.args, bench.files
    targets = []

    def serving(name: str, url_of: Callable[[Variant], str], key: str | None, child: Child, timeout: float) -> None:
        children.append(child)
        wait_until_serving(name, url_of, files, key, child.proc, timeout)

    if "direct" in args.targets:
        targets.append(Target("direct", backend.url, None, one_process(None)))
    if "nginx" in args.targets:
        proxy = start_proxy(args.work, backend, args.gateway_cpu)
        serving("nginx proxy", proxy.url, None, proxy.child, 10)
        targets.append(Target("nginx", proxy.url, None, one_process(proxy.child.pid)))
    if "pipe" in args.targets:
        pipe = start_pipe(args.work, args.python, backend, args.gateway_cpu)
        serving("python pipe", pipe.url, None, pipe.child, 10)
        targets.append(Target("pipe", pipe.url, None, one_process(pipe.child.pid)))
    if "vllm-router" in args.targets:
        router = start_vllm_router(args.work, args.vllm_router, backend, args.gateway_cpu)
        for router_child in router.children.values():
            serving("vllm-router", router.url, None, router_child, 30)
        targets.append(Target("vllm-router", router.url, None, router.pid))
    routes = {v.model: backend.url(v) for v in VARIANTS}
    if checkout is not None:
        gateway = start_gateway(args.work / "baseline", args.python, routes, args.gateway_cpu, repo=checkout.path)
        serving(f"the gateway of {checkout.short}", gateway.url, gateway.key, gateway.child, 60)
        label = f"baseline {checkout.short}"
        targets.append(Target("baseline", gateway.url, gateway.key, one_process(gateway.child.pid), label))
    for name, overrides in GATEWAYS.items():
        if name in args.targets:
            gateway = start_gateway(args.work / name, args.python, routes, args.gateway_cpu, overrides=overrides)
            serving(name, gateway.url, gateway.key, gateway.child, 60)
            targets.append(Target(name, gateway.url, gateway.key, one_process(gateway.child.pid)))
    # Measured in the order --targets names them: the first of two alike can come out a few % apart.
    targets.sort(key=lambda target: args.targets.index(target.name))
    return targets


def measure_round(
    bench: Bench, targets: list[Target], children: list[Child], kind: str, connections: int, round_: int
) -> list[dict]:
    """One run of one scenario per target, in the order given."""
    rows = []
    for target in targets:
        settle(children)
        row = measure(bench, target, kind, connections)
        row["round"] = round_ + 1
        rows.append(row)
        gone = [c.name for c in children if c.proc.poll() is not None]
        if gone:
            raise RuntimeError(f"{', '.join(gone)} exited during {kind} c={connections}")
    return rows


def warm_up_all(bench: Bench, targets: list[Target], children: list[Child]) -> None:
    for target in targets:
        log(f"warming up {target.label or target.name}")
        warm_up(bench, target)
        settle(children)
        for variant in VARIANTS:
            pid = target.pid_of(variant)
            if pid:
                target.idle_rss_kb[variant.name] = procstat.rss_kb(pid)


def run_canned(bench: Bench, results: dict, checkout: Checkout | None) -> None:
    """--repeat rounds of every scenario, each round with its targets started afresh and taking turns in an
    order that reverses every other round.

    A process's own speed on a shared machine is partly luck of where it lands (its memory, its caches):
    two processes of the same code have differed by a third in user time, keeping their lead or lag for
    as long as they ran. Processes that lived through every round carried that luck into every figure
    of theirs; started anew for each round, the luck is dealt again and the median sees past it."""
    args, files = bench.args, bench.files
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
    rows: list[dict] = []
    names: list[str] = []
    backend = start_backend(args.work, files, args.load_cpus)
    try:
        wait_until_serving("nginx backend", backend.url, files, None, backend.child.proc, 10)
        for round_ in range(args.repeat):
            if args.repeat > 1:
                log(f"round {round_ + 1} of {args.repeat}: the targets start afresh")
            children: list[Child] = [backend.child]
            for stale in TARGET_DIRS:  # a round starts from nothing another left: no ledger, no log
                shutil.rmtree(args.work / stale, ignore_errors=True)
            try:
                targets = start_targets(bench, backend, children, checkout)
                names = [target.name for target in targets]
                warm_up_all(bench, targets, children)
                order = targets if round_ % 2 == 0 else targets[::-1]
                for kind, connections in plan:
                    rows += measure_round(bench, order, children, kind, connections, round_)
                gateway_target = next((t for t in targets if t.name == "gateway"), None)
                if "leak" in args.scenarios and gateway_target and round_ == args.repeat - 1:
                    settle(children)
                    results["leak"] = leak_check(bench, gateway_target)
            finally:
                for child in reversed(children[1:]):
                    child.stop()
    finally:
        backend.child.stop()
    if args.repeat > 1:
        results["runs"].extend(rows)
    for kind, connections in plan:
        for name in names:
            done = [r for r in rows if r["kind"] == kind and r["connections"] == connections and r["target"] == name]
            results["scenarios"].append(report.median_row(done))


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
    if "vllm-router" in args.targets and not os.access(args.vllm_router, os.X_OK):
        log(f"vllm-router is not installed at {args.vllm_router}; benchmarks/run.sh installs it")
        return 2
    for stale in ("nginx-backend", *TARGET_DIRS, "vllm"):
        shutil.rmtree(args.work / stale, ignore_errors=True)
    checkout = None
    if "baseline" in args.targets:
        try:
            checkout = baseline.checkout(REPO, args.baseline, args.work / BASELINE_TREE)
        except RuntimeError as error:
            log(str(error))
            return 2
        log(f"baseline: {args.baseline} is {checkout.short}, checked out in {checkout.path}")
    try:
        trees = ([REPO] if set(args.targets) & set(GATEWAYS) else []) + ([checkout.path] if checkout else [])
        for tree in trees:
            built = baseline.build_request_path(tree, args.python)
            log(f"{tree.name}: request path {'compiled' if built else 'as Python (a revision before mypyc)'}")
    except RuntimeError as error:
        log(str(error))
        return 2
    bench = Bench(args, write_canned(args.work / "canned"))
    results: dict = {
        "meta": meta(bench, checkout),
        "scenarios": [],
        "runs": [],
        "leak": None,
        "vllm": None,
        "targets": [],
        "comparison": [],
    }

    status = 0
    try:
        if set(args.scenarios) - {"vllm"}:
            run_canned(bench, results, checkout)
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
    comparison = report.comparison_checks(results["scenarios"])
    results["comparison"] = [dict(zip(("target", "value", "op", "limit", "unit"), c, strict=True)) for c in comparison]
    summary = report.summary_text(results)
    # A broken run must not replace the results of the last good one.
    out = args.out if status == 0 else args.work / "failed"
    report.write_json(out / "latest.json", results)
    (out / "latest.txt").write_text(summary + "\n" + checks_text(comparison, COMPARISON_TITLE) + "\n")
    if report.plot(out / "throughput.png", results["scenarios"]):
        log(f"plot: {out / 'throughput.png'}")
    log(f"results: {out / 'latest.json'}")
    print()
    print(summary)
    # A failed target is a finding of a good run, not a broken run: the exit status stays the run's.
    print_targets(comparison, COMPARISON_TITLE)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
