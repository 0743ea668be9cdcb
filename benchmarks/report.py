"""Turns the measurements into the printed table, the pass/fail list of the issue's targets and the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGET_ORDER = ("direct", "nginx", "pipe", "gateway", "gateway-bare")
KIND_TITLES = {"json": "non-streamed", "stream": "whole SSE stream", "paced": "paced SSE stream (~1 s)"}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _row(rows: list[dict], kind: str, target: str, connections: int | None = None) -> dict | None:
    matches = [
        r
        for r in rows
        if r["kind"] == kind and r["target"] == target and (connections is None or r["connections"] == connections)
    ]
    if connections is None and matches:
        return max(matches, key=lambda r: r["connections"])
    return matches[0] if matches else None


def _check(name: str, value: float | None, op: str, limit: float, unit: str, detail: str = "") -> dict:
    ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
    return {"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "ok": ok, "detail": detail}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluate(rows: list[dict], leak: dict | None, vllm: dict | None) -> list[dict]:
    """The issue's targets, each as value vs limit; ok is None when the run did not measure it."""
    checks = []

    gw, ng = _row(rows, "json", "gateway"), _row(rows, "json", "nginx")
    ratio = _ratio(gw and gw["rps"], ng and ng["rps"])
    checks.append(_check(f"non-streamed req/s vs nginx (c={gw['connections'] if gw else '?'})", ratio, ">=", 0.4, "x"))

    for kind in ("stream", "paced"):
        for row in [r for r in rows if r["kind"] == kind and r["target"] == "gateway"]:
            other = _row(rows, kind, "nginx", row["connections"])
            ratio = _ratio(row.get("cpu_us_per_event"), other and other.get("cpu_us_per_event"))
            checks.append(
                _check(f"CPU per relayed event vs nginx ({kind}, c={row['connections']})", ratio, "<=", 1.5, "x")
            )

    # What the usage ledger and the metrics cost: CPU with them over CPU without (gateway-bare).
    for kind, figure in (("json", "cpu_us_per_request"), ("stream", "cpu_us_per_event")):
        for row in [r for r in rows if r["kind"] == kind and r["target"] == "gateway"]:
            bare = _row(rows, kind, "gateway-bare", row["connections"])
            if bare is not None:
                ratio = _ratio(row.get(figure), bare.get(figure))
                label = f"CPU per {'request' if kind == 'json' else 'event'}, ledger+metrics on vs off"
                checks.append(_check(f"{label} ({kind}, c={row['connections']})", ratio, "<=", 1.05, "x"))

    gw, direct = _row(rows, "json", "gateway", 1), _row(rows, "json", "direct", 1)
    added = gw["latency_ms"]["p50"] - direct["latency_ms"]["p50"] if gw and direct else None
    checks.append(_check("added p50 latency at c=1 vs direct", added, "<=", 0.3, "ms"))

    gw, ng = _row(rows, "paced", "gateway"), _row(rows, "paced", "nginx")
    conc = f"c={gw['connections'] if gw else '?'}"
    for pct in ("p50", "p99"):
        ratio = _ratio(gw and gw["latency_ms"][pct], ng and ng["latency_ms"][pct])
        checks.append(_check(f"paced stream duration {pct} vs nginx ({conc})", ratio, "<=", 1.1, "x"))
    checks.append(_check(f"paced stream errors ({conc})", gw and gw["error_count"], "<=", 0, ""))
    checks.append(_check(f"RSS per open stream ({conc})", gw and gw.get("rss_kb_per_stream"), "<=", 50, "KB"))

    drift, detail, first = None, "", "~10k"
    if leak and leak.get("rss_first_kb") and leak.get("rss_last_kb"):
        drift = abs(leak["rss_last_kb"] / leak["rss_first_kb"] - 1) * 100
        detail = f"{leak['first_requests']:,} -> {leak['total_requests']:,} requests"
        first = f"{leak['checkpoint']:,}"
    checks.append(_check(f"RSS drift, end vs after the first {first} requests", drift, "<=", 10, "%", detail))

    ratio = added = None
    if vllm and "direct" in vllm:
        ratio = _ratio(vllm["gateway"]["output_tokens_per_s"], vllm["direct"]["output_tokens_per_s"])
        added = vllm["gateway"]["ttft_p50_ms"] - vllm["direct"]["ttft_p50_ms"]
    checks.append(_check("real vLLM output tokens/s vs direct", ratio, ">=", 0.98, "x"))
    checks.append(_check("real vLLM added TTFT p50", added, "<=", 2.0, "ms"))
    return checks


def table(rows: list[dict]) -> str:
    head = (
        "scenario",
        "target",
        "conc",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "CPU us/req",
        "CPU us/event",
        "proxy core %",
        "load core %",
        "RSS MB",
        "KB/stream",
    )
    lines = []
    for row in rows:
        lines.append(
            (
                row["kind"],
                row["target"],
                _fmt(row["connections"]),
                _fmt(row["rps"], 0),
                _fmt(row["latency_ms"]["p50"], 2),
                _fmt(row["latency_ms"]["p99"], 2),
                _fmt(row["error_count"]),
                _fmt(row.get("cpu_us_per_request")),
                _fmt(row.get("cpu_us_per_event"), 2),
                _fmt(row["proxy_core_busy_pct"], 0) if row["target"] != "direct" else "-",
                _fmt(row["load_core_busy_pct"], 0),
                _fmt(row.get("rss_peak_mb")),
                _fmt(row.get("rss_kb_per_stream")),
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]

    def render(cells) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([render(head), render(["-" * w for w in widths]), *map(render, lines)])


def leak_table(leak: dict) -> str:
    lines = ["requests   RSS MB"]
    for point in leak["checkpoints"]:
        lines.append(f"{point['requests']:>9,}  {point['rss_kb'] / 1024:7.1f}")
    return "\n".join(lines)


def vllm_table(vllm: dict) -> str:
    head = f"{'':8}  {'out tok/s':>9}  {'TTFT p50':>9}  {'TTFT p99':>9}  {'ITL p50':>8}  {'ITL p99':>8}  failed"
    lines = [head]
    for target in ("direct", "gateway"):
        s = vllm[target]
        lines.append(
            f"{target:8}  {s['output_tokens_per_s']:9.1f}  {s['ttft_p50_ms']:7.2f}ms  "
            f"{s['ttft_p99_ms']:7.2f}ms  {s['itl_p50_ms']:6.2f}ms  {s['itl_p99_ms']:6.2f}ms  {s['failed']}"
        )
    return "\n".join(lines)


def targets_text(checks: list[dict]) -> str:
    lines = []
    for check in checks:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[check["ok"]]
        unit = f" {check['unit']}" if check["unit"] else ""
        digits = {"x": 3, "ms": 3, "%": 1, "KB": 1}.get(check["unit"], 0)
        value = "not measured" if check["value"] is None else f"{check['value']:.{digits}f}{unit}"
        detail = f"  ({check['detail']})" if check["detail"] else ""
        lines.append(
            f"  {mark}  {check['target']:<54} {value:>13}   target {check['op']} {check['limit']:g}{unit}{detail}"
        )
    return "\n".join(lines)


def floor_text(rows: list[dict]) -> str | None:
    """The same ratios as the targets, for python_pipe.py: what no Python relay can beat."""
    lines = []
    for kind, connections, field, label in (
        ("json", 32, "rps", "non-streamed req/s vs nginx (c=32)"),
        ("stream", 32, "cpu_us_per_event", "CPU per relayed event vs nginx (stream, c=32)"),
        ("paced", 256, "cpu_us_per_event", "CPU per relayed event vs nginx (paced, c=256)"),
    ):
        ratios = []
        for target in ("pipe", "gateway"):
            mine, theirs = _row(rows, kind, target, connections), _row(rows, kind, "nginx", connections)
            ratios.append(_ratio(mine[field], theirs[field]) if mine and theirs else None)
        if ratios[0] is not None:
            gateway = "-" if ratios[1] is None else f"{ratios[1]:.3f} x"
            lines.append(f"  {label:<54} pipe {ratios[0]:.3f} x   gateway {gateway}")
    return "\n".join(lines) or None


def summary_text(results: dict) -> str:
    parts = []
    python = results.get("meta", {}).get("python")
    if python:
        parts += [f"Python of the gateway and the pipe: {python}", ""]
    if results["scenarios"]:
        parts += [
            "Load through one core (req/s, latency: wrk; CPU and RSS of the proxy process from /proc)",
            "",
            table(results["scenarios"]),
            "",
        ]
    if results.get("leak"):
        parts += ["Gateway RSS over a long run (leak check)", "", leak_table(results["leak"]), ""]
    if results.get("vllm") and "direct" in results["vllm"]:
        parts += ["Through real vLLM (vllm.benchmarks.serve)", "", vllm_table(results["vllm"]), ""]
    floor = floor_text(results["scenarios"])
    if floor:
        parts += ["The floor for a Python relay (python_pipe.py: uvloop, bytes piped, no HTTP at all)", "", floor, ""]
    parts += ["Targets (ratios within this run)", "", targets_text(results["targets"])]
    return "\n".join(parts)


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def plot(path: Path, rows: list[dict]) -> bool:
    """requests/s and p99 latency vs concurrency, one line per target, one column per kind of request."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is missing; no plot written (run.sh installs it)", file=sys.stderr)
        return False
    kinds = [k for k in KIND_TITLES if any(r["kind"] == k for r in rows)]
    if not kinds:
        return False
    colours = {
        "direct": "#7f7f7f",
        "nginx": "#2ca02c",
        "pipe": "#ff7f0e",
        "gateway": "#1f77b4",
        "gateway-bare": "#9467bd",
    }
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 6.5), squeeze=False)
    for col, kind in enumerate(kinds):
        for target in TARGET_ORDER:
            points = sorted(
                (r for r in rows if r["kind"] == kind and r["target"] == target), key=lambda r: r["connections"]
            )
            if not points:
                continue
            xs = [p["connections"] for p in points]
            axes[0][col].plot(xs, [p["rps"] for p in points], "o-", color=colours[target], label=target)
            axes[1][col].plot(xs, [p["latency_ms"]["p99"] for p in points], "o-", color=colours[target], label=target)
        axes[0][col].set_title(KIND_TITLES[kind], fontsize=10)
        levels = sorted({r["connections"] for r in rows if r["kind"] == kind})
        for row in (0, 1):
            axis = axes[row][col]
            axis.set_xscale("log", base=2)
            axis.set_xticks(levels, [str(level) for level in levels])
            axis.minorticks_off()
            if len(levels) == 1:
                axis.set_xlim(levels[0] / 2, levels[0] * 2)
            axis.set_xlabel("concurrent connections")
            axis.grid(True, alpha=0.3)
        axes[0][col].set_ylim(bottom=0)
        axes[1][col].set_ylim(bottom=0)
    axes[0][0].set_ylabel("requests/s")
    axes[1][0].set_ylabel("p99 latency (ms)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Gateway vs nginx reverse proxy vs a bare Python pipe vs direct (proxy on one core)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
