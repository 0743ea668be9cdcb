"""Instructions per relayed request, counted by valgrind's callgrind: this tree's gateway against the gateway
of another revision, on the canned backend of bench.py.

Wall-clock CPU time on a shared machine moves by 20% between runs minutes apart; an instruction count does
not move with the neighbours, so a difference of a few percent between two revisions shows here when
bench.py cannot tell it from noise. It is a count, not a time: a cache miss or a system call costs far more
than an instruction, so use it to compare revisions of the same code, and bench.py for the figures the
issues name.

Each gateway runs under callgrind with counting off while it starts. Counting is then switched on for an
idle spell (the periodic work: health rounds, flushes, snapshots) and for a fixed number of requests from
a client in this process. The idle rate, per second, is taken off the load's count, because under
callgrind a request takes some fifty times as long, so periodic work would weigh fifty times as much
against it as it does at full speed.

    .venv/bin/python benchmarks/instructions.py --baseline 6f66452 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import baseline
from bench import GATEWAYS
from canned import VARIANTS, CannedFiles, write_canned
from servers import REPO, Gateway, chat_request, log, read_answer, start_backend, start_gateway, wait_until_serving

HERE = Path(__file__).resolve().parent
KINDS = {v.name: v for v in VARIANTS if not v.paced}  # paced streams add waiting, which counts nothing
PYTHON = str(REPO / ".venv" / "bin" / "python")


@dataclass(frozen=True)
class Counted:
    """One gateway's figures: instructions a second while idle, and per request of each kind."""

    label: str
    idle_per_second: float
    per_request: dict[str, float]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/instructions.py", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="the revision to compare with (default main)")
    parser.add_argument("--requests", type=int, default=2000, help="requests of each kind counted (default 2000)")
    parser.add_argument("--connections", type=int, default=8, help="client connections (default 8)")
    parser.add_argument(
        "--targets",
        default="baseline,gateway",
        help=f"baseline and any of {', '.join(GATEWAYS)} (bench.py's: features off), in order "
        "(default baseline,gateway)",
    )
    parser.add_argument("--kinds", default="json,stream", help="json, stream or both (default both)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle counting (default 10)")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "instructions", help="scratch directory")
    return parser.parse_args(argv)


# ---- a client that sends an exact number of requests ------------------------------------------------


async def send_requests(port: int, request: bytes, total: int, connections: int) -> None:
    left = [total]
    statuses: dict[int, int] = {}

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left[0] > 0:
                left[0] -= 1
                writer.write(request)
                status, _ = await read_answer(reader)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    if set(statuses) != {200}:
        raise RuntimeError(f"answers other than 200: {statuses}")


# ---- callgrind -------------------------------------------------------------------------------------


def callgrind_control(*argv: str) -> None:
    subprocess.run(["callgrind_control", *argv], check=True, capture_output=True, timeout=300)


def dumped_total(out_dir: Path, before: set[Path]) -> int:
    """The instruction total of the one dump written since `before` was listed."""
    deadline = time.monotonic() + 60
    while True:
        new = sorted(set(out_dir.glob("callgrind.out*")) - before)
        for path in new:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    return int(line.split()[1])
        if time.monotonic() > deadline:
            raise RuntimeError(f"no callgrind dump appeared in {out_dir}")
        time.sleep(0.2)


def counted_spell(pid: int, out_dir: Path, spell) -> tuple[int, float]:
    """Instructions the gateway ran, and seconds it took, while `spell()` runs."""
    before = set(out_dir.glob("callgrind.out*"))
    callgrind_control("--zero", str(pid))
    callgrind_control("--instr=on", str(pid))
    started = time.monotonic()
    spell()
    seconds = time.monotonic() - started
    callgrind_control("--instr=off", str(pid))
    callgrind_control("--dump", str(pid))
    return dumped_total(out_dir, before), seconds


def count_gateway(
    args: argparse.Namespace, label: str, repo: Path, files: CannedFiles, routes, overrides: dict[str, str]
) -> Counted:
    work = (args.work / label).resolve()
    if work.exists():
        shutil.rmtree(work)
    out_dir = work / "callgrind"
    out_dir.mkdir(parents=True)
    launcher = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_dir}/callgrind.out.%p",
    ]
    gateway: Gateway = start_gateway(
        work, PYTHON, routes, None, overrides=overrides, repo=repo, launcher=launcher, start_timeout=600
    )
    try:
        wait_until_serving(label, gateway.url, files, gateway.key, gateway.child.proc, timeout=600)
        pid = gateway.child.pid
        # Warm: the first requests of each kind fill caches and pools, which no later request pays for.
        for variant in KINDS.values():
            asyncio.run(
                send_requests(
                    gateway.port,
                    chat_request(f"127.0.0.1:{gateway.port}", files.body(variant).read_bytes(), gateway.key),
                    50,
                    2,
                )
            )
        idle, idle_seconds = counted_spell(pid, out_dir, lambda: time.sleep(args.idle))
        idle_rate = idle / idle_seconds
        per_request = {}
        for name in args.kinds.split(","):
            request = chat_request(f"127.0.0.1:{gateway.port}", files.body(KINDS[name]).read_bytes(), gateway.key)
            total, seconds = counted_spell(
                pid,
                out_dir,
                lambda request=request: asyncio.run(
                    send_requests(gateway.port, request, args.requests, args.connections)
                ),
            )
            per_request[name] = (total - idle_rate * seconds) / args.requests
            log(
                f"{label}: {name} {per_request[name]:,.0f} instructions a request "
                f"({total:,} in {seconds:.1f} s, idle {idle_rate:,.0f}/s)"
            )
        return Counted(label, idle_rate, per_request)
    finally:
        gateway.child.stop()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        log("valgrind is not installed (apt-get install valgrind)")
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    files = write_canned(args.work / "canned")
    backend = start_backend(args.work, files, None)
    try:
        routes = {v.model: backend.url(v) for v in VARIANTS}
        results = []
        # Each revision's request path as it ships: compiled, from the revision that compiles it.
        baseline.build_request_path(REPO, PYTHON)
        for target in args.targets.split(","):
            if target == "baseline":
                base = baseline.checkout(REPO, args.baseline, args.work / "baseline-tree")
                baseline.build_request_path(base.path, PYTHON)
                results.append(count_gateway(args, f"baseline-{base.short}", base.path, files, routes, {}))
            else:
                results.append(count_gateway(args, target, REPO, files, routes, GATEWAYS[target]))
    finally:
        backend.child.stop()
    print_table(results, args.kinds.split(","))
    return 0


def print_table(results: list[Counted], kinds: list[str]) -> None:
    """Each target's counts, and its ratio to the first one's."""
    print(f"{'':22}" + "".join(f"{r.label:>22}" for r in results))
    rows = [(f"{kind} per request", [r.per_request[kind] for r in results]) for kind in kinds]
    rows.append(("idle per second", [r.idle_per_second for r in results]))
    for name, values in rows:
        cells = [f"{values[0]:22,.0f}"]
        cells += [f"{v:13,.0f} ({v / values[0]:.3f}x)" for v in values[1:]]
        print(f"{name:22}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
