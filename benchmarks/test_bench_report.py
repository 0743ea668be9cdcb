"""The driver's options for the new targets and what the report computes from the rows of a run: medians of
--repeat runs, the ratios of the gateway to its baseline, to vllm-router and to itself without features.

    .venv/bin/pytest benchmarks/test_bench_report.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from bench import DEFAULT_TARGETS, GATEWAYS, parse_args
from servers import vllm_router_argv
from targets import checks_text


def row(kind: str, target: str, connections: int = 32, cpu: float | None = 100.0, rps: float = 1000.0, **extra):
    base = {
        "kind": kind,
        "target": target,
        "label": target,
        "connections": connections,
        "requests": 3000,
        "rps": rps,
        "latency_ms": {"p50": 1.0, "p99": 2.0},
        "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
        "error_count": 0,
        "short_answers": False,
        "cpu_us_per_request": cpu,
    }
    return base | extra


# ---- options ----------------------------------------------------------------------------------------


def test_baseline_option_adds_the_baseline_target_to_the_default_ones():
    args = parse_args(["--baseline", "6f66452"])
    assert args.baseline == "6f66452"
    assert args.targets == [*DEFAULT_TARGETS, "baseline"]
    assert args.repeat == 1
    assert parse_args([]).targets == DEFAULT_TARGETS


def test_named_targets_are_kept_in_their_order_with_a_repeat_count():
    args = parse_args(["--targets", "baseline,vllm-router,gateway,gateway-bare", "--baseline", "main", "--repeat", "3"])
    assert args.targets == ["baseline", "vllm-router", "gateway", "gateway-bare"]
    assert args.repeat == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--targets", "baseline,gateway"], "the target baseline needs --baseline REV"),
        (["--targets", "gateway,envoy"], "unknown: envoy"),
        (["--repeat", "0"], "must be at least 1"),
    ],
)
def test_bad_options_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "installs"),
    [
        (["--quick", "--targets", "gateway,vllm-router"], True),
        (["--targets=vllm-router", "--duration", "3"], True),
        (["--targets", "gateway", "--baseline", "vllm-router"], False),
        (["--targets", "vllm-router-x,gateway"], False),
        (["--quick"], False),
    ],
)
def test_run_sh_installs_vllm_router_only_when_targets_name_it(argv, installs):
    run_sh = Path(__file__).resolve().parent / "run.sh"
    # The function alone, taken out of the script (sourcing run.sh would run it).
    script = f'eval "$(sed -n "/^names_target()/,/^}}/p" {run_sh})"; names_target vllm-router "$@"'
    done = subprocess.run(["bash", "-c", script, "bash", *argv], capture_output=True, text=True)
    assert done.stderr == ""
    assert (done.returncode == 0) is installs


def test_each_feature_cost_target_turns_off_its_feature_alone_and_bare_turns_off_all():
    assert GATEWAYS["gateway"] == {}
    assert GATEWAYS["gateway-no-metrics"] == {"GATEWAY_METRICS": "false"}
    assert GATEWAYS["gateway-no-ledger"] == {"GATEWAY_USAGE_LEDGER": "false"}
    assert GATEWAYS["gateway-no-admission"] == {"GATEWAY_ADMISSION": "false"}
    assert GATEWAYS["gateway-bare"] == {
        "GATEWAY_METRICS": "false",
        "GATEWAY_USAGE_LEDGER": "false",
        "GATEWAY_ADMISSION": "false",
    }


def test_vllm_router_has_one_worker_the_plain_policy_and_its_own_metrics_port():
    argv = vllm_router_argv("vllm-router", 8001, "http://127.0.0.1:9000", 8002)
    assert argv[argv.index("--worker-urls") + 1 :][:1] == ["http://127.0.0.1:9000"]
    assert argv[argv.index("--worker-urls") + 2].startswith("--")  # one worker only
    assert argv[argv.index("--policy") + 1] == "round_robin"
    assert argv[argv.index("--port") + 1] == "8001"
    assert argv[argv.index("--prometheus-port") + 1] == "8002"


# ---- medians of --repeat ----------------------------------------------------------------------------


def test_median_row_takes_each_figures_median_and_adds_up_errors():
    runs = [
        row("json", "gateway", cpu=90.0, rps=900.0, round=1),
        row("json", "gateway", cpu=120.0, rps=1100.0, round=2, error_count=2, short_answers=True),
        row("json", "gateway", cpu=100.0, rps=1000.0, round=3),
    ]
    runs[1]["errors"] = {**runs[1]["errors"], "timeout": 2}
    runs[2]["latency_ms"] = {"p50": 3.0, "p99": 9.0}

    median = report.median_row(runs)

    assert median["cpu_us_per_request"] == 100.0
    assert median["rps"] == 1000.0
    assert median["latency_ms"] == {"p50": 1.0, "p99": 2.0}
    assert median["error_count"] == 2 and median["errors"]["timeout"] == 2
    assert median["short_answers"] is True
    assert median["repeats"] == 3 and "round" not in median
    assert (median["kind"], median["target"], median["connections"]) == ("json", "gateway", 32)


def test_median_row_of_a_figure_some_run_lacks_is_none():
    runs = [row("json", "direct", cpu=None), row("json", "direct", cpu=None)]
    assert report.median_row(runs)["cpu_us_per_request"] is None


# ---- ratios and targets -----------------------------------------------------------------------------


def checks_by_label(rows: list[dict]) -> dict[str, tuple[float, str, float, bool]]:
    from targets import passed

    return {c[0]: (round(c[1], 6), c[2], c[3], passed(c)) for c in report.comparison_checks(rows)}


def test_comparison_checks_compute_the_issue_targets_as_ratios_within_the_run():
    base = "baseline 6f66452"
    rows = [
        row("json", "baseline", cpu=100.0, label=base),
        row("json", "vllm-router", cpu=50.0, rps=8000.0),
        row("json", "gateway", cpu=104.0, rps=6000.0),
        row("json", "gateway-bare", cpu=80.0),
        row("stream", "baseline", cpu=200.0, label=base),
        row("stream", "vllm-router", cpu=100.0, rps=5000.0),
        row("stream", "gateway", cpu=220.0, rps=5500.0),
        row("stream", "gateway-bare", cpu=210.0),
        row("paced", "vllm-router", 256, cpu=1500.0),
        row("paced", "gateway", 256, cpu=1200.0),
    ]
    assert checks_by_label(rows) == {
        f"CPU per request vs {base} (json, c=32)": (1.04, "<=", 1.05, True),
        f"CPU per stream vs {base} (stream, c=32)": (1.1, "<=", 1.05, False),
        "req/s vs vllm-router (json, c=32)": (0.75, ">=", 1.0, False),
        "req/s vs vllm-router (stream, c=32)": (1.1, ">=", 1.0, True),
        "CPU per paced stream vs vllm-router (c=256)": (0.8, "<=", 1.0, True),
        "CPU per request, metrics+ledger+admission on vs off (json, c=32)": (1.3, "<=", 1.05, False),
        "CPU per stream, metrics+ledger+admission on vs off (stream, c=32)": (round(220 / 210, 6), "<=", 1.05, True),
    }


def test_comparison_checks_leave_out_what_the_run_did_not_measure():
    rows = [row("json", "gateway"), row("json", "nginx"), row("json", "baseline", cpu=None)]
    assert report.comparison_checks(rows) == []
    assert "none measured" in checks_text([], "Targets")


def test_req_per_second_is_compared_at_32_connections_when_both_ran_it():
    rows = [
        row("json", "vllm-router", 1, rps=9000.0),
        row("json", "gateway", 1, rps=1000.0),
        row("json", "vllm-router", 32, rps=8000.0),
        row("json", "gateway", 32, rps=8800.0),
    ]
    assert list(checks_by_label(rows)) == ["req/s vs vllm-router (json, c=32)"]


def test_comparison_table_shows_each_figure_beside_the_others_with_the_ratios():
    rows = [
        row("json", "baseline", cpu=100.0, rps=2000.0, label="baseline 6f66452"),
        row("json", "vllm-router", cpu=50.0, rps=4000.0),
        row("json", "gateway", cpu=125.0, rps=1000.0),
    ]
    text = report.comparison_text(rows)
    assert text is not None
    head, _, cpu, rps = text.splitlines()
    assert head.split() == [
        "scenario",
        "conc",
        "figure",
        "gateway",
        "baseline",
        "6f66452",
        "vllm-router",
        "vs",
        "baseline",
        "vs",
        "vllm-router",
    ]
    assert cpu.split() == ["json", "32", "CPU", "us/request", "125.0", "100.0", "50.0", "1.250", "x", "2.500", "x"]
    assert rps.split() == ["json", "32", "req/s", "1,000", "2,000", "4,000", "0.500", "x", "0.250", "x"]
    assert report.comparison_text([row("json", "gateway"), row("json", "nginx")]) is None


def test_feature_table_gives_each_features_cost_as_the_gateway_over_the_gateway_without_it():
    rows = [
        row("stream", "gateway", cpu=150.0),
        row("stream", "gateway-no-metrics", cpu=120.0),
        row("stream", "gateway-no-admission", cpu=150.0),
        row("stream", "gateway-bare", cpu=100.0),
    ]
    text = report.features_text(rows)
    assert text is not None
    head, _, line = text.splitlines()
    assert "without metrics" in head and "without admission" in head and "without all three" in head
    assert "without ledger" not in head  # not in the run
    assert "120.0 (1.250 x)" in line and "150.0 (1.000 x)" in line and "100.0 (1.500 x)" in line
