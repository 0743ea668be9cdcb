"""Server time of each of the console's data calls, with 100 keys and a year of usage (docs/console.md).

    .venv/bin/python benchmarks/console_pages.py [--calls 20] [--keys 100] [--log-lines 200000] [--keep]

Builds a work directory (benchmarks/work/console_pages/): `--keys` keys in the key file (the key store's
own code, as `keys create` writes them) and their audit trail; a usage ledger with a year of hourly rows
of every key for 3 models (2.6 million rows with 100 keys, written straight into the SQLite file with
the ledger's schema); a request log of `--log-lines` access lines over the last day (44 MB with 200k,
under the 50 MB rotation); each model's server log and a year of fleet events. Starts 3 simulated
models (python -m vllm_simulator) and one gateway worker in front of them on free ports, then times
each call `--calls` times after one warm-up, one call at a time on a kept-alive loopback connection,
from the request's first byte to the answer's last as the client sees it, and prints the median and
95th percentile. A year of usage by day is 12 pages of 31 days (the ledger's page limit): each page is
one call, and the sum of the 12 is printed apart. Not part of run.sh's scenarios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from servers import Child, free_port, log, spawn, wait_for_port

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's gateway, not an installed one

from vllm_gateway import audit  # noqa: E402
from vllm_gateway.access_log import key_label  # noqa: E402
from vllm_gateway.keystore import KeyStore  # noqa: E402
from vllm_gateway.usage_ledger import FIELDS, SCHEMA  # noqa: E402

MODELS = ("llama-8b", "qwen-14b", "mistral-7b")
HOUR, DAY = 3600, 86_400
YEAR_HOURS = 365 * 24
WORK = REPO / "benchmarks" / "work" / "console_pages"


# ---- the work directory ----------------------------------------------------------------------------


def make_keys(work: Path, count: int) -> tuple[str, list[str]]:
    """`count` user keys and an admin key, with a create line each in the audit trail; (the admin
    key, the users' key ids)."""
    store = KeyStore(work / "api_keys.json")
    actor = audit.cli_actor()
    admin, secret = store.create("console-admin", admin=True)
    audit.record(work / "logs", actor, "create", admin, changes={"admin": True})
    ids = []
    for index in range(count):
        record, _ = store.create(f"team-{index:03d}", rate_limit="600/minute")
        audit.record(work / "logs", actor, "create", record, changes={"rate_limit": "600/minute"})
        ids.append(record.id)
    return secret, ids


def make_ledger(path: Path, key_ids: list[str], now: int) -> int:
    """A year of hourly rows, every key and model each hour, in the ledger's own table."""
    first = (now - 365 * DAY) // HOUR * HOUR
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(SCHEMA)
    insert = (
        f"INSERT INTO usage (hour, key_id, model, {', '.join(FIELDS)}) VALUES ({', '.join('?' * (3 + len(FIELDS)))})"
    )
    rows = 0
    connection.execute("BEGIN")
    for hour_index in range(YEAR_HOURS):
        hour = first + hour_index * HOUR
        batch = [
            (hour, key_id, model, 3 + k % 7, 900 + 37 * k, 400 + 11 * m, k % 2, 0, 0)
            for k, key_id in enumerate(key_ids)
            for m, model in enumerate(MODELS)
        ]
        connection.executemany(insert, batch)
        rows += len(batch)
    connection.execute("COMMIT")
    connection.close()
    return rows


def make_request_log(path: Path, key_ids: list[str], lines: int, now: float) -> None:
    """`lines` access lines over the last day, as access_log.LogWriter writes them: mostly 200s, a few
    429s, 404s and 503s, of every key and model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [key_label(key_id, f"team-{index:03d}") for index, key_id in enumerate(key_ids)]
    start = now - DAY
    with path.open("w") as file:
        for index in range(lines):
            at = start + DAY * index / lines
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f",{int(at % 1 * 1000):03d}"
            model = MODELS[index % 3]
            # Every 50th line an error, each model having each kind in turn.
            status = (429, 404, 503)[index // 150 % 3] if index % 50 == 0 else 200
            tokens = "" if status != 200 else f" prompt_tokens={200 + index % 900} completion_tokens={index % 500}"
            backend = model if status in (200, 503) else "-"
            file.write(
                f"{stamp} INFO access rid={index:032x} POST /v1/chat/completions status={status} "
                f"duration_ms={5 + index % 4000 / 10:.1f} key={labels[index % len(labels)]} model={model} "
                f"backend={backend}{tokens}\n"
            )


def make_fleet_files(work: Path, now: float) -> None:
    """Each model's server log (20k lines) and a year of the supervisor's events (a few a day)."""
    logs = work / "logs"
    with (logs / "fleet_events.jsonl").open("w") as events:
        for day in range(365):
            for index, model in enumerate(MODELS):
                at = now - (365 - day) * DAY + index * 60
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + ".000Z"
                for event in ("start", "ready"):
                    events.write(json.dumps({"time": stamp, "event": event, "model": model, "pid": 1000 + day}) + "\n")
    for model in MODELS:
        with (logs / f"{model}.log").open("w") as server_log:
            for index in range(20_000):
                server_log.write(f"INFO 12-03 06:00:00 [loggers.py:123] Engine 000: Avg prompt throughput: {index}\n")


def write_model_config(path: Path, ports: dict[str, int]) -> None:
    lines = [
        f"vllm_model name={model} path=/models/{model} port={port} max_num_seqs=8" for model, port in ports.items()
    ]
    path.write_text("\n".join(lines) + "\n")


# ---- the processes ---------------------------------------------------------------------------------


def start_simulators(work: Path) -> tuple[dict[str, int], list[Child]]:
    ports, children = {}, []
    for model in MODELS:
        port = ports[model] = free_port()
        argv = [sys.executable, "-m", "vllm_simulator", "--port", str(port), "--served-model-name", model]
        child = spawn(model, [*argv, "--first-token-delay", "0"], work / f"{model}.out", None, cwd=REPO)
        children.append(child)
        wait_for_port(port, child.proc, model, child.log_path)
    return ports, children


def start_gateway(work: Path) -> tuple[int, Child]:
    port = free_port()
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")},
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_KEY_FILE": str(work / "api_keys.json"),
        "GATEWAY_LOG_DIR": str(work / "logs"),
        "VLLM_LOG_DIR": str(work / "logs"),
        "VLLM_RUN_DIR": str(work / "run"),
        "VLLM_MODEL_CONFIG": str(work / "models.sh"),
        "GATEWAY_ENV_FILE": str(work / "no-env-file"),
    }
    child = spawn(
        "gateway", [sys.executable, str(REPO / "vllm_api_server.py"), "serve"], work / "gateway.out", None, env, REPO
    )
    wait_for_port(port, child.proc, "gateway", child.log_path, timeout=60)
    return port, child


# ---- timing ----------------------------------------------------------------------------------------


def timed(client: httpx.Client, path: str, params: dict[str, object] | None = None) -> tuple[float, dict]:
    started = time.perf_counter()
    response = client.get(path, params=params)
    body = response.content
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"GET {path} answered {response.status_code}: {body[:300]!r}")
    return elapsed, json.loads(body)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def measure(calls: int, call: Callable[[], tuple[float, dict]]) -> tuple[list[float], dict]:
    call()  # warm-up: imports, caches and the first sample are no page's cost
    results = [call() for _ in range(calls)]
    return [seconds for seconds, _ in results], results[-1][1]


def year_by_day(client: httpx.Client, now: int) -> list[float]:
    """The 12 pages of a year of usage by day (all keys and models together): each page's time."""
    params: dict[str, object] = {"start_time": now - 365 * DAY, "bucket_width": "1d", "limit": 31}
    times = []
    while True:
        seconds, page = timed(client, "/admin/usage", params)
        times.append(seconds)
        if not page["has_more"]:
            return times
        params["page"] = page["next_page"]


def run(args: argparse.Namespace) -> None:
    work = WORK
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    now = time.time()
    log(f"work directory {work}: {args.keys} keys, a year of usage, {args.log_lines} request lines")
    admin, key_ids = make_keys(work, args.keys)
    started = time.perf_counter()
    rows = make_ledger(work / "usage.db", key_ids, int(now))
    log(f"usage ledger: {rows} rows in {time.perf_counter() - started:.0f} s")
    make_request_log(work / "logs" / "vllm_api_server.log", key_ids, args.log_lines, now)
    make_fleet_files(work, now)
    ports, children = start_simulators(work)
    write_model_config(work / "models.sh", ports)
    port, gateway = start_gateway(work)
    children.append(gateway)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {admin}"}, timeout=120
        ) as client:
            deadline = time.monotonic() + 60
            while client.get("/health").json()["models_ready"] < len(MODELS):
                if time.monotonic() > deadline:
                    raise RuntimeError("the simulated models never became ready")
                time.sleep(0.2)
            table = pages(client, args.calls, int(now))
    finally:
        for child in children:
            child.stop()
    print(
        f"Server time per call, {args.calls} calls each (ms), {args.keys} keys, {rows} usage rows, "
        f"{args.log_lines} request lines:"
    )
    print(f"{'call':<64} {'median':>8} {'p95':>8}  answer")
    for name, times, answer in table:
        median, p95 = statistics.median(times) * 1000, percentile(times, 0.95) * 1000
        print(f"{name:<64} {median:8.1f} {p95:8.1f}  {answer}")
    if not args.keep:
        shutil.rmtree(work)


def pages(client: httpx.Client, calls: int, now: int) -> list[tuple[str, list[float], str]]:
    month = {"start_time": now - 30 * DAY, "bucket_width": "1d", "limit": 30, "group_by": "api_key_id"}
    table = []
    for name, path, params in (
        ("GET /admin/overview", "/admin/overview", None),
        (f"GET /admin/models/{MODELS[0]}", f"/admin/models/{MODELS[0]}", None),
        ("GET /admin/requests?limit=100", "/admin/requests", {"limit": 100}),
        ("GET /admin/requests?key=<none of its lines>: the scan's bound", "/admin/requests", {"key": "nobody"}),
        ("GET /admin/keys", "/admin/keys", None),
        ("GET /admin/usage 30 days by day, grouped by key", "/admin/usage", month),
        ("GET /admin/audit", "/admin/audit", None),
    ):
        times, answer = measure(calls, lambda path=path, params=params: timed(client, path, params))
        table.append((name, times, f"{len(json.dumps(answer)) / 1024:.0f} KiB"))
        log(f"{name}: done")
    sweeps = [year_by_day(client, now) for _ in range(max(2, calls // 12))]
    each = [seconds for sweep in sweeps for seconds in sweep]
    table.append((f"GET /admin/usage a year by day: one page of 31 days ({len(sweeps[0])} pages)", each, ""))
    table.append(("  the whole year: the sum of its pages", [sum(sweep) for sweep in sweeps], ""))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="timed calls of each page (default 20)")
    parser.add_argument("--keys", type=int, default=100, help="keys in the key file and the ledger (default 100)")
    parser.add_argument("--log-lines", type=int, default=200_000, help="access lines in the request log")
    parser.add_argument("--keep", action="store_true", help=f"leave {WORK.relative_to(REPO)} for a look")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
