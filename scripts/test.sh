#!/usr/bin/env bash
# Usage: scripts/test.sh [PYTEST ARGS...] [-h|--help]
#
# Every check the project has, in the order that fails fastest: ruff (lint and format), mypy (strict on
# the packages), then the whole test suite under coverage, the gateway's own processes included, with
# the coverage floor of pyproject.toml ([tool.coverage.report] fail_under).
# Run scripts/install_test_deps.sh once first. PYTEST ARGS go to pytest (a file, -k EXPR, -x, ...);
# with any of them the coverage floor is not applied, since a part of the suite covers less.
# The whole suite runs on TEST_WORKERS pytest-xdist workers (default: two more than the cores, at most
# 8), one test file per worker at a time (--dist loadfile), so that a file's gateway and simulator are
# started once. Many tests wait on processes (a start, a health round, a timeout) rather than compute,
# so workers beyond the cores fill those waits (docs/development.md has the figures).
# All of these run the gateway's sources as Python (GATEWAY_COMPILED=0), which coverage can see.
# Coverage measures each process from its first import of vllm_gateway on, and not the many that never
# import it (tests/support/coverage_hook.py says why and how; install_coverage_hook puts its .pth file
# into .venv). Beside them run the tests of COMPILED_TESTS against what scripts/install.sh ships: the
# request path compiled by mypyc (scripts/compile_gateway.py; install_test_deps.sh builds it, and here
# it is built again first, only when the sources changed since), with GATEWAY_COMPILED=1, without
# coverage, on as many workers as cores; their output follows the others'. Both wait on processes much
# of the time, so together they keep the cores busier than one after the other. Tests marked `alone`
# (real vLLM, which answers its health checks late when another test computes beside it) run last, one
# at a time.
#
# Exit status: 0 all passed, 1 a check or a test failed.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$REPO_DIR/.venv/bin/python"

# What runs against the compiled request path: every test module whose gateway relays, streams, limits,
# admits or answers errors, and the one that checks which build a gateway runs.
COMPILED_TESTS=(
    tests/test_compiled_build.py
    tests/test_metrics_recording.py
    tests/test_gateway_requests.py
    tests/test_gateway_streaming.py
    tests/test_gateway_relay_framing.py
    tests/test_gateway_openai_sdk.py
    tests/test_gateway_upstream.py
    tests/test_gateway_token_counting.py
    tests/test_gateway_token_limits.py
    tests/test_gateway_limits.py
    tests/test_gateway_admission.py
    tests/test_gateway_admission_workers.py
    tests/test_gateway_http.py
    tests/test_front_pipelining.py
    tests/test_front_slow_clients.py
    tests/test_front_oversized_heads.py
)

step() { printf '\n== %s\n' "$*" >&2; }

# install_coverage_hook: the .pth file that runs tests/support/coverage_hook.py at the start of .venv's
# Python where GATEWAY_COVERAGE_HOOK names it, and does nothing elsewhere.
install_coverage_hook() {
    local site_packages
    site_packages="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    printf '%s\n' 'import os; exec(compile(open(os.environ["GATEWAY_COVERAGE_HOOK"]).read(), os.environ["GATEWAY_COVERAGE_HOOK"], "exec"), {"__name__": "gateway_coverage_hook"}) if os.environ.get("GATEWAY_COVERAGE_HOOK") else None' \
        >"$site_packages/gateway_coverage_hook.pth"
}

# cores: how many CPU cores this machine has.
cores() {
    nproc 2>/dev/null || echo 1
}

# default_workers: two pytest-xdist workers more than the cores, at most 8.
default_workers() {
    local count
    count="$(cores)"
    echo $((count + 2 > 8 ? 8 : count + 2))
}

# under_coverage COMMAND...: COMMAND with the gateway's sources as Python, measured in every process that
# imports them, each writing its data beside the others here, whatever its working directory.
under_coverage() {
    GATEWAY_COMPILED=0 GATEWAY_COVERAGE_HOOK="$REPO_DIR/tests/support/coverage_hook.py" \
        GATEWAY_COVERAGE_CONFIG="$REPO_DIR/pyproject.toml" COVERAGE_FILE="$REPO_DIR/.coverage" "$@"
}

# compiled_tests: the tests of COMPILED_TESTS against the compiled request path, as many workers as cores.
compiled_tests() {
    GATEWAY_COMPILED=1 "$PYTHON" -m pytest -n "$(cores)" --dist loadfile -m "not alone" \
        -p no:cacheprovider "${COMPILED_TESTS[@]}"
}

main() {
    if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
        sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
        return 0
    fi
    [[ -x "$PYTHON" ]] || { echo "test: no .venv; run scripts/install_test_deps.sh first" >&2; return 1; }
    cd "$REPO_DIR"
    step "ruff check"
    "$PYTHON" -m ruff check .
    step "ruff format --check"
    "$PYTHON" -m ruff format --check .
    step "mypy"
    "$PYTHON" -m mypy
    rm -f .coverage .coverage.*
    install_coverage_hook
    if (($# > 0)); then
        step "pytest under coverage"
        under_coverage "$PYTHON" -m coverage run -m pytest "$@"
        "$PYTHON" -m coverage combine -q
        "$PYTHON" -m coverage report --fail-under=0
        return 0
    fi
    step "the compiled request path: its build"
    "$PYTHON" scripts/compile_gateway.py
    step "pytest under coverage, and beside it the compiled request path's tests (their output follows)"
    local compiled_log compiled_pid failed=0
    compiled_log="$(mktemp)"
    # shellcheck disable=SC2064  # the path is fixed now
    trap "rm -f '$compiled_log'" EXIT
    compiled_tests >"$compiled_log" 2>&1 &
    compiled_pid=$!
    under_coverage "$PYTHON" -m coverage run -m pytest -n "${TEST_WORKERS:-$(default_workers)}" --dist loadfile \
        -m "not alone" || failed=1
    step "the compiled request path's tests"
    wait "$compiled_pid" || failed=1
    cat "$compiled_log"
    ((failed == 0)) || return 1
    step "pytest under coverage: real vLLM"
    under_coverage "$PYTHON" -m coverage run -m pytest -m alone
    "$PYTHON" -m coverage combine -q
    step "coverage"
    "$PYTHON" -m coverage report
}

main "$@"
