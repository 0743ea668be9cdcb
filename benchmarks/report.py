"""Turns the measurements into the printed table, the pass/fail list of the issue's targets and the plot."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from targets import Check

TARGET_ORDER = (
    "direct",
    "nginx",
    "pipe",
    "vllm-router",
    "baseline",
    "gateway",
    "gateway-bare",
    "gateway-no-metrics",
    "gateway-no-ledger",
    "gateway-no-admission",
    "gateway-python",
)
FEATURES = ("metrics", "ledger", "admission")
# What a row's CPU per request is, per kind: a whole answer, or a whole stream of 103 events.
PER = {"json": "request", "stream": "stream", "paced": "stream"}
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


def median_row(rows: list[dict]) -> dict:
    """The row of one scenario and target over its --repeat runs: each figure's median. Errors are added up
    (one in any run is one too many) and a run with short answers marks the row."""
    first = dict(rows[0])
    first.pop("round", None)
    first["repeats"] = len(rows)
    if len(rows) == 1:
        return first
    for key, value in first.items():
        if key in ("kind", "target", "label", "connections", "repeats"):
            continue
        values = [row[key] for row in rows]
        if key == "errors":
            first[key] = {name: sum(v[name] for v in values) for name in value}
        elif key == "error_count":
            first[key] = sum(values)
        elif key == "short_answers":
            first[key] = any(values)
        elif key == "latency_ms":
            first[key] = {name: statistics.median(v[name] for v in values) for name in value}
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            first[key] = statistics.median(values)
        else:
            first[key] = None  # not measured in some run: no median of it
    return first


def _levels(rows: list[dict], kind: str, target: str) -> list[int]:
    return sorted({r["connections"] for r in rows if r["kind"] == kind and r["target"] == target})


def _pair_level(rows: list[dict], kind: str, a: str, b: str, preferred: int) -> int | None:
    """`preferred` connections when both targets ran it, else the most both ran."""
    common = set(_levels(rows, kind, a)) & set(_levels(rows, kind, b))
    if preferred in common:
        return preferred
    return max(common) if common else None


def comparison_checks(rows: list[dict]) -> list[Check]:
    """The targets against the gateway's previous revision (baseline), vllm-router and the gateway with its
    features off (gateway-bare), as ratios within the run; only those whose two sides the run measured."""
    checks: list[Check] = []
    cpu = "cpu_us_per_request"

    def add(label: str, kind: str, c: int, other: str, figure: str, op: str, limit: float) -> None:
        mine, theirs = _row(rows, kind, "gateway", c), _row(rows, kind, other, c)
        ratio = _ratio(mine and mine.get(figure), theirs and theirs.get(figure))
        if ratio is not None:
            checks.append((label, ratio, op, limit, "x"))

    for kind in ("json", "stream"):
        for c in _levels(rows, kind, "gateway"):
            base = _row(rows, kind, "baseline", c)
            label = f"CPU per {PER[kind]} vs {base['label'] if base else 'baseline'} ({kind}, c={c})"
            add(label, kind, c, "baseline", cpu, "<=", 1.05)
    for kind in ("json", "stream"):
        c = _pair_level(rows, kind, "gateway", "vllm-router", 32)
        if c is not None:
            add(f"req/s vs vllm-router ({kind}, c={c})", kind, c, "vllm-router", "rps", ">=", 1.0)
    for c in _levels(rows, "paced", "gateway"):
        add(f"CPU per paced stream vs vllm-router (c={c})", "paced", c, "vllm-router", cpu, "<=", 1.0)
    for kind in ("json", "stream"):
        for c in _levels(rows, kind, "gateway"):
            label = f"CPU per {PER[kind]}, metrics+ledger+admission on vs off ({kind}, c={c})"
            add(label, kind, c, "gateway-bare", cpu, "<=", 1.05)
    return checks


def _render(head: tuple[str, ...], lines: list[tuple[str, ...]], left: int) -> str:
    """Columns padded to their widest cell; the first `left` aligned left, the rest right."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]

    def render(cells) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([render(head), render(["-" * w for w in widths]), *map(render, lines)])


def _scenarios(rows: list[dict]) -> list[tuple[str, int]]:
    """(kind, connections) in the order they ran."""
    return list(dict.fromkeys((r["kind"], r["connections"]) for r in rows))


def comparison_text(rows: list[dict]) -> str | None:
    """The gateway beside its previous revision and vllm-router, per scenario, with the ratios."""
    others = [t for t in ("baseline", "vllm-router") if any(r["target"] == t for r in rows)]
    if not others or not any(r["target"] == "gateway" for r in rows):
        return None
    labels = {t: next(r["label"] for r in rows if r["target"] == t) for t in others}
    head = ("scenario", "conc", "figure", "gateway", *(labels[t] for t in others), *(f"vs {t}" for t in others))
    lines = []
    for kind, c in _scenarios(rows):
        mine = _row(rows, kind, "gateway", c)
        if mine is None:
            continue
        for figure, name, digits in (("cpu_us_per_request", f"CPU us/{PER[kind]}", 1), ("rps", "req/s", 0)):
            theirs = [_row(rows, kind, t, c) for t in others]
            values = [r and r.get(figure) for r in theirs]
            ratios = [_ratio(mine.get(figure), v) for v in values]
            lines.append(
                (
                    kind,
                    _fmt(c),
                    name,
                    _fmt(mine.get(figure), digits),
                    *(_fmt(v, digits) for v in values),
                    *("-" if r is None else f"{r:.3f} x" for r in ratios),
                )
            )
    return _render(head, lines, left=1) if lines else None


def features_text(rows: list[dict]) -> str | None:
    """What each of the gateway's features costs: its CPU with everything on over its CPU without that one."""
    without = [("gateway-no-" + f, f"without {f}") for f in FEATURES] + [("gateway-bare", "without all three")]
    present = [(t, name) for t, name in without if any(r["target"] == t for r in rows)]
    if not present or not any(r["target"] == "gateway" for r in rows):
        return None
    head = ("scenario", "conc", "figure", "gateway", *(name for _, name in present))
    lines = []
    for kind, c in _scenarios(rows):
        mine = _row(rows, kind, "gateway", c)
        if mine is None:
            continue
        cells = []
        for target, _ in present:
            other = _row(rows, kind, target, c)
            value = other and other.get("cpu_us_per_request")
            ratio = _ratio(mine.get("cpu_us_per_request"), value)
            cells.append("-" if ratio is None else f"{_fmt(value)} ({ratio:.3f} x)")
        lines.append((kind, _fmt(c), f"CPU us/{PER[kind]}", _fmt(mine.get("cpu_us_per_request")), *cells))
    return _render(head, lines, left=1) if lines else None


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
        "user us/req",
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
                row.get("label") or row["target"],
                _fmt(row["connections"]),
                _fmt(row["rps"], 0),
                _fmt(row["latency_ms"]["p50"], 2),
                _fmt(row["latency_ms"]["p99"], 2),
                _fmt(row["error_count"]),
                _fmt(row.get("cpu_us_per_request")),
                _fmt(row.get("user_us_per_request")),
                _fmt(row.get("cpu_us_per_event"), 2),
                _fmt(row["proxy_core_busy_pct"], 0) if row["target"] != "direct" else "-",
                _fmt(row["load_core_busy_pct"], 0),
                _fmt(row.get("rss_peak_mb")),
                _fmt(row.get("rss_kb_per_stream")),
            )
        )
    return _render(head, lines, left=2)


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
    rows = results["scenarios"]
    if rows:
        repeat = results.get("meta", {}).get("repeat", 1)
        medians = f"; each figure the median of {repeat} runs" if repeat > 1 else ""
        parts += [
            f"Load through one core (req/s, latency: wrk; CPU and RSS of the proxy process from /proc{medians})",
            "",
            table(rows),
            "",
        ]
    short = [f"{r['label']} ({r['kind']}, c={r['connections']})" for r in rows if r.get("short_answers")]
    if short:
        parts += [f"WARNING: answers shorter than the canned response from {', '.join(short)}", ""]
    comparison = comparison_text(rows)
    if comparison:
        parts += [
            "The gateway beside its baseline and vllm-router (ratios: gateway over the other)",
            "",
            comparison,
            "",
        ]
    features = features_text(rows)
    if features:
        parts += [
            "What each feature costs: CPU of the gateway, and without the feature (ratio: gateway over that)",
            "",
            features,
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
        "vllm-router": "#d62728",
        "baseline": "#8c564b",
        "gateway-no-metrics": "#e377c2",
        "gateway-no-ledger": "#bcbd22",
        "gateway-no-admission": "#17becf",
        "gateway-python": "#aec7e8",
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
            label = points[0].get("label") or target
            axes[0][col].plot(xs, [p["rps"] for p in points], "o-", color=colours[target], label=label)
            axes[1][col].plot(xs, [p["latency_ms"]["p99"] for p in points], "o-", color=colours[target], label=label)
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
    fig.suptitle("The gateway and the alternatives, each proxy on one core (direct: no proxy)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
