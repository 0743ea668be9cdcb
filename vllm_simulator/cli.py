"""The simulator's command line: vLLM's flags plus its own pace and fault flags, then serve.

Run: python -m vllm_simulator --served-model-name NAME [--port 8000] [...]  (or `vllm-simulator`)
The environment's VLLM_SERVER_DEV_MODE=1 adds vLLM's development routes (sleep mode), as it does for vLLM,
and its VLLM_API_KEY is the key --api-key would give, which the flag overrides, as vLLM's is.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import fields

from aiohttp import web

from .app import create_app
from .config import SimulatorConfig
from .errors import ERROR_SHAPES, ApiError
from .faults import Faults

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_simulator",
        description="vLLM SIMULATOR: serves vLLM's OpenAI API with made-up tokens and no model, "
        "for tests, benchmarks and GPU-less demos. Not a real inference server.",
    )
    parser.add_argument("model_tag", nargs="?", help="model path, as `vllm serve MODEL` takes it")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", help="model path shown as `root` (default: the first name)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="names clients use; the first is the primary (default: the model)",
    )
    parser.add_argument("--first-token-delay", type=float, default=0.05, metavar="SECONDS")
    parser.add_argument(
        "--token-rate",
        type=float,
        default=200.0,
        metavar="TOKENS_PER_S",
        help="tokens per second per request; 0 = as fast as possible",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=8, metavar="N", help="requests generating at once; the rest wait in a queue"
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--startup-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sleep this long before opening the port, like loading weights",
    )
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` under /v1 (default: $VLLM_API_KEY)")
    parser.add_argument(
        "--exit-after",
        type=float,
        metavar="SECONDS",
        help="exit this long after serving starts, as a server that crashes (with --exit-code)",
    )
    parser.add_argument("--exit-code", type=int, default=1, metavar="N", help="the --exit-after exit code (default 1)")
    sleep = parser.add_argument_group("sleep mode (its routes need VLLM_SERVER_DEV_MODE=1, as vLLM's do)")
    sleep.add_argument(
        "--enable-sleep-mode",
        action="store_true",
        help="as vLLM's: a sleep offloads the model; without it a sleep only pauses the scheduler",
    )
    sleep.add_argument(
        "--sleep-seconds",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long POST /sleep (level 1 or 2) takes (default 1.0)",
    )
    sleep.add_argument(
        "--wake-seconds",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long a full POST /wake_up takes: 3/4 the weights, 1/4 the KV cache (default 2.0)",
    )
    faults = parser.add_argument_group("fault defaults (change at run time: /_simulator/faults)")
    faults.add_argument("--error-status", type=int, metavar="STATUS")
    faults.add_argument("--error-shape", choices=ERROR_SHAPES, help="the shape of the --error-status answer")
    faults.add_argument("--slow-start", type=float, metavar="SECONDS")
    faults.add_argument("--crash-after-tokens", type=int, metavar="N")
    faults.add_argument("--exit-after-tokens", type=int, metavar="N")
    faults.add_argument("--health-status", type=int, metavar="STATUS")
    faults.add_argument("--slow-tokenize", type=float, metavar="SECONDS")
    faults.add_argument("--slow-health", type=float, metavar="SECONDS")
    faults.add_argument("--split-body-at", type=int, metavar="BYTES")
    faults.add_argument("--body-piece-bytes", type=int, metavar="BYTES")
    # The fleet scripts launch the simulator with the command line they would give `vllm serve`.
    ignored = parser.add_argument_group("accepted for command-line compatibility with vLLM; no effect")
    ignored.add_argument("--tensor-parallel-size", "-tp", type=int)
    ignored.add_argument("--gpu-memory-utilization", type=float)
    ignored.add_argument("--enforce-eager", action="store_true")
    ignored.add_argument("--max-parallel-loading-workers", type=int)
    ignored.add_argument("--dtype")
    return parser


def parse_config(
    argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[SimulatorConfig, Faults, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    if args.model_tag and args.model and args.model_tag != args.model:
        parser.error("give the model either as an argument or with --model, not both")
    model = args.model or args.model_tag
    names = tuple(args.served_model_name or ([model] if model else []))
    if not names:
        parser.error("give --served-model-name NAME or --model PATH")
    if args.max_num_seqs < 1:
        parser.error("--max-num-seqs must be at least 1")
    if args.sleep_seconds < 0 or args.wake_seconds < 0:
        parser.error("--sleep-seconds and --wake-seconds must be at least 0")
    # vLLM reads it as bool(int(value)) and fails to start on anything else.
    dev_mode = environ.get("VLLM_SERVER_DEV_MODE", "0").strip()
    if not re.fullmatch(r"[+-]?[0-9]+", dev_mode, re.ASCII):
        parser.error(f"VLLM_SERVER_DEV_MODE must be an integer (0 or 1), not {dev_mode!r}")
    try:
        faults = Faults.parse({f.name: getattr(args, f.name) for f in fields(Faults)})
    except ApiError as exc:
        parser.error(exc.message)
    config = SimulatorConfig(
        served_model_names=names,
        model_path=model or names[0],
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        first_token_delay=max(0.0, args.first_token_delay),
        token_rate=max(0.0, args.token_rate),
        api_key=args.api_key or environ.get("VLLM_API_KEY") or None,
        dev_mode=int(dev_mode) != 0,
        enable_sleep_mode=args.enable_sleep_mode,
        sleep_seconds=args.sleep_seconds,
        wake_seconds=args.wake_seconds,
    )
    return config, faults, args


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _exit_later(seconds: float, code: int) -> None:
    def end() -> None:
        log.error("SIMULATOR: exiting with code %d after %g s (--exit-after)", code, seconds)
        logging.shutdown()
        os._exit(code)

    asyncio.get_running_loop().call_later(seconds, end)


def main(argv: list[str] | None = None) -> None:
    config, faults, args = parse_config(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    if args.startup_delay > 0:
        log.info("SIMULATOR: pretending to load weights for %.1f s", args.startup_delay)
        time.sleep(args.startup_delay)
    log.info(
        "vLLM SIMULATOR (no model; lorem tokens) serving %s on http://%s:%d "
        "(max-num-seqs %d, first token %.3f s, %g tokens/s, faults %s)",
        list(config.served_model_names),
        args.host,
        args.port,
        config.max_num_seqs,
        config.first_token_delay,
        config.token_rate,
        faults.active(),
    )
    if config.dev_mode:
        log.warning(
            "SIMULATOR: development routes on (VLLM_SERVER_DEV_MODE): /sleep, /wake_up, /is_sleeping "
            "(sleep mode %s, sleep %g s, wake %g s)",
            "enabled" if config.enable_sleep_mode else "not enabled: a sleep only pauses",
            config.sleep_seconds,
            config.wake_seconds,
        )
    app = create_app(config, faults)
    if args.exit_after is not None:
        app.on_startup.append(lambda _app: _exit_later(args.exit_after, args.exit_code))
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=2.0,
        loop=_event_loop(),
    )
