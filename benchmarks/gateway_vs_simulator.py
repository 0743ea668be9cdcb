"""A two-minute check of what the gateway adds: requests/s and latency through it vs direct to the
vLLM simulator, non-streamed and streamed. The full comparison with nginx is benchmarks/run.sh.

    .venv/bin/python benchmarks/gateway_vs_simulator.py [--duration 10] [--connections 1,32]

The gateway runs alone on core 0; the simulator and wrk share core 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from canned import request_body
from loadgen import Load, run_wrk
from servers import REPO, free_port, spawn, start_gateway, wait_for_port

MODEL = "sim"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--connections", default="1,32", help="comma-separated wrk connections (default 1,32)")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="gateway-vs-sim-") as tmp:
        work = Path(tmp)
        port = free_port()
        simulator = spawn(
            "simulator",
            [
                python,
                "-m",
                "vllm_simulator",
                "--port",
                str(port),
                "--served-model-name",
                MODEL,
                "--first-token-delay",
                "0",
                "--token-rate",
                "0",
            ],
            work / "simulator.log",
            [1],
            cwd=REPO,
        )
        gateway = None
        try:
            wait_for_port(port, simulator.proc, "simulator", simulator.log_path)
            direct_url = f"http://127.0.0.1:{port}/v1/chat/completions"
            gateway = start_gateway(
                work / "gateway",
                python,
                {MODEL: f"http://127.0.0.1:{port}"},
                cpu=0,
                overrides={"GATEWAY_RATE_LIMIT": "1000000000/minute", "GATEWAY_CONCURRENCY_LIMIT": "100000"},
            )
            through_url = gateway.base_url + "/v1/chat/completions"
            print(
                f"{'mode':<10}{'conns':>6}{'direct req/s':>14}{'gateway req/s':>15}"
                f"{'direct p50 ms':>15}{'gateway p50 ms':>16}{'added p50 ms':>14}"
            )
            for stream in (False, True):
                body = work / f"body-{stream}.json"
                body.write_bytes(request_body(MODEL, stream))
                for connections in (int(c) for c in args.connections.split(",")):
                    runs = {}
                    for name, url, key in (("direct", direct_url, None), ("gateway", through_url, gateway.key)):
                        load = Load(url, [body], key, connections, args.duration, 30.0, [1])
                        runs[name] = run_wrk(load, None)
                    direct, through = runs["direct"], runs["gateway"]
                    d50, g50 = direct.latency_us["p50"] / 1000, through.latency_us["p50"] / 1000
                    print(
                        f"{'stream' if stream else 'json':<10}{connections:>6}{direct.rps:>14.0f}"
                        f"{through.rps:>15.0f}{d50:>15.2f}{g50:>16.2f}{g50 - d50:>14.2f}",
                        flush=True,
                    )
        finally:
            if gateway is not None:
                gateway.child.stop()
            simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
