"""End to end through real vLLM: vLLM's own load client against one vLLM CPU server, directly and through
the gateway, in turns, with the same prompts. Reports output-token throughput, TTFT and inter-token latency.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from servers import REPO, Gateway, free_port, log, post, start_gateway

CLIENT = Path(__file__).resolve().parent / "vllm_client.py"
SERVED_NAME = "tiny"


@dataclass(frozen=True)
class VllmOptions:
    prompts: int
    concurrency: int
    input_len: int
    output_len: int
    rounds: int
    gateway_cpu: int | None  # the gateway alone on one core, as in the canned scenarios
    load_cpus: list[int] | None  # vLLM (every process) and its load client together on others


def pin_tree(pids: set[int], cpus: str) -> None:
    for pid in pids:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpus, str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


def wait_for_model(gateway: Gateway) -> None:
    """Wait until a chat completion through the gateway succeeds: its health check has found vLLM ready."""
    ping = json.dumps({"model": SERVED_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]})
    for _ in range(120):
        status, payload = post(gateway.base_url, ping.encode(), gateway.key)
        if status == 200:
            return
        if gateway.child.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited; see {gateway.child.log_path}")
        time.sleep(0.5)
    raise RuntimeError(f"the gateway does not serve {SERVED_NAME}: {status} {payload[:300]!r}")


def _client(
    vllm_python: str, base_url: str, tokenizer: str, options: VllmOptions, prompts: int, key: str | None, out: Path
) -> dict:
    argv = [
        vllm_python,
        str(CLIENT),
        "--backend",
        "openai-chat",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        SERVED_NAME,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(options.input_len),
        "--random-output-len",
        str(options.output_len),
        "--num-prompts",
        str(prompts),
        "--max-concurrency",
        str(options.concurrency),
        "--ignore-eos",
        "--seed",
        "0",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    if options.load_cpus:
        argv = ["taskset", "-c", ",".join(map(str, options.load_cpus)), *argv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("OPENAI_API_KEY", None)
    if key:
        env["OPENAI_API_KEY"] = key
    if out.exists():
        out.unlink()
    with open(out.with_suffix(".log"), "wb") as client_log:
        done = subprocess.run(argv, env=env, cwd=REPO, stdout=client_log, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"vLLM's load client failed (status {done.returncode}); see {out.with_suffix('.log')}")
    return json.loads(out.read_text())


def _summary(results: list[dict]) -> dict:
    def mean(key: str) -> float:
        return sum(r[key] for r in results) / len(results)

    return {
        "runs": len(results),
        "completed": sum(r["completed"] for r in results),
        "failed": sum(r.get("failed", 0) for r in results),
        "output_tokens_per_s": mean("output_throughput"),
        "requests_per_s": mean("request_throughput"),
        "ttft_p50_ms": mean("median_ttft_ms"),
        "ttft_p99_ms": mean("p99_ttft_ms"),
        "itl_p50_ms": mean("median_itl_ms"),
        "itl_p99_ms": mean("p99_itl_ms"),
        "tpot_p50_ms": mean("median_tpot_ms"),
    }


def run_vllm(work: Path, gateway_python: str, options: VllmOptions) -> dict:
    # tests/support starts the real vLLM server for the end-to-end tests; the benchmark reuses it.
    sys.path.insert(0, str(REPO))
    from tests.support.real_vllm import start_real_vllm, tiny_model_dir, vllm_python

    python = vllm_python()
    if not Path(python).exists():
        raise RuntimeError(f"no vLLM interpreter at {python}: create .venv-vllm (see README) or set VLLM_PYTHON")
    work.mkdir(parents=True, exist_ok=True)
    log("making the tiny model (once) and starting a real vLLM CPU server (70-90 s on two cores)")
    model_dir = tiny_model_dir()
    load_cpus = ",".join(map(str, options.load_cpus or []))
    if load_cpus:
        # vLLM's CPU build binds its compute threads itself (by default to the first core); give it the load
        # core, and once every process exists, pin them all there, so the gateway's core is its own.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = load_cpus
    server = start_real_vllm(free_port(), SERVED_NAME, model_dir, work / "vllm.log")
    gateway = None
    try:
        if load_cpus:
            pin_tree(server.handle.tree(), load_cpus)
        log(f"vLLM ready after {server.startup_seconds:.0f} s; starting the gateway in front of it")
        gateway = start_gateway(
            work / "gateway",
            gateway_python,
            {SERVED_NAME: server.base_url},
            cpu=options.gateway_cpu,
            model_path=model_dir,
        )
        wait_for_model(gateway)

        urls = {"direct": (server.base_url, None), "gateway": (gateway.base_url, gateway.key)}
        log("warming vLLM up")
        _client(
            python,
            server.base_url,
            model_dir,
            options,
            min(options.prompts, 2 * options.concurrency),
            None,
            work / "warmup.json",
        )
        runs: dict[str, list[dict]] = {"direct": [], "gateway": []}
        for number in range(options.rounds):
            # Alternate the order (direct, gateway, gateway, direct, ...) so drift favours neither side.
            order = ("direct", "gateway") if number % 2 == 0 else ("gateway", "direct")
            for target in order:
                log(f"vLLM round {number + 1}/{options.rounds}: {target}")
                url, key = urls[target]
                runs[target].append(
                    _client(python, url, model_dir, options, options.prompts, key, work / f"{target}-{number}.json")
                )
    finally:
        if gateway is not None:
            gateway.child.stop()
        server.stop()
    return {
        "model": "tiny random-weight Llama (tests/support/tiny_model.py), float32, vLLM CPU build",
        "prompts": options.prompts,
        "concurrency": options.concurrency,
        "input_len": options.input_len,
        "output_len": options.output_len,
        "rounds": options.rounds,
        "gateway_core": options.gateway_cpu,
        "vllm_and_client_cores": options.load_cpus,
        "direct": _summary(runs["direct"]),
        "gateway": _summary(runs["gateway"]),
    }
