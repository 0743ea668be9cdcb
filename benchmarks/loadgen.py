"""One load run: wrk on the load core against one URL, with the target's CPU and memory sampled from /proc."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import procstat

LUA = Path(__file__).resolve().parent / "chat.lua"
SAMPLE_EVERY = 0.25


@dataclass(frozen=True)
class Load:
    url: str
    bodies: list[Path]
    key: str | None
    connections: int
    duration: float
    timeout: float
    cpus: list[int] | None  # wrk runs one thread per core, pinned to these


@dataclass(frozen=True)
class Measured:
    """What wrk reported plus what /proc said about the target (pid) meanwhile."""

    requests: int
    seconds: float
    bytes: int  # everything read, heads included, and what arrived of the answers cut off at the end
    errors: dict[str, int]
    latency_us: dict[str, float]
    cpu_seconds: float | None
    cpu_user_seconds: float | None  # of cpu_seconds, the process's own (the rest is the kernel's)
    rss_before_kb: int | None
    rss_peak_kb: int | None
    rss_after_kb: int | None
    core_busy: dict[int, float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_wrk(load: Load, pid: int | None) -> Measured:
    threads = min(len(load.cpus or [0]), load.connections)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{load.connections}",
        f"-d{max(1, round(load.duration))}s",
        f"--timeout={max(1, round(load.timeout))}s",
        "-s",
        str(LUA),
        load.url,
    ]
    if load.cpus:
        argv = ["taskset", "-c", ",".join(map(str, load.cpus)), *argv]
    env = dict(os.environ, BENCH_BODIES=":".join(str(b) for b in load.bodies), BENCH_KEY=load.key or "")

    cpu_before = procstat.cpu_split(pid) if pid else None
    rss_before = procstat.rss_kb(pid) if pid else None
    cores_before = procstat.core_times()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = rss_before
    try:
        while proc.poll() is None:
            time.sleep(SAMPLE_EVERY)
            if pid:
                peak = max(peak or 0, procstat.rss_kb(pid))
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:  # the driver is being stopped
            proc.kill()
            proc.wait()
    cores = procstat.core_times().busy_fraction_since(cores_before)
    cpu_after = procstat.cpu_split(pid) if pid else None
    rss_after = procstat.rss_kb(pid) if pid else None

    lines = [line for line in stdout.decode().splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"wrk failed (status {proc.returncode}): {' '.join(argv)}\n"
            f"{stdout.decode()[-2000:]}{stderr.decode()[-2000:]}"
        )
    result = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    return Measured(
        requests=result["requests"],
        seconds=result["duration_us"] / 1e6,
        bytes=result["bytes"],
        errors=result["errors"],
        latency_us=result["latency_us"],
        cpu_seconds=sum(cpu_after) - sum(cpu_before) if cpu_after and cpu_before else None,
        cpu_user_seconds=cpu_after[0] - cpu_before[0] if cpu_after and cpu_before else None,
        rss_before_kb=rss_before,
        rss_peak_kb=max(peak or 0, rss_after or 0) if pid else None,
        rss_after_kb=rss_after,
        core_busy=cores,
    )
