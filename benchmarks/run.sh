#!/usr/bin/env bash
# Benchmark the gateway against nginx as a reverse proxy, vllm-router, another revision of itself and the
# bare backend, in one run.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$BENCH_DIR")"
VENV="$REPO_DIR/.venv"
# The Rust router from PyPI, in a virtualenv of its own (it brings its own FastAPI and uvicorn); bench.py
# looks for it there.
VLLM_ROUTER_VERSION=0.1.17
VLLM_ROUTER_VENV="$BENCH_DIR/work/vllm-router-venv"

# shellcheck source=scripts/install_lib.sh
source "$REPO_DIR/scripts/install_lib.sh"
LOG_PREFIX=bench

usage() {
    cat <<EOF
Usage: benchmarks/run.sh [--quick] [--skip-install] [driver options]

Runs the gateway, nginx as a reverse proxy and the bare nginx backend side by side under wrk (and, when
--targets names them, vllm-router and the gateway of another revision), with the proxy under test pinned
to one core and the load to another, then (unless --quick) the same comparison through a real vLLM CPU
server with vLLM's own load client. Prints a table last and writes benchmarks/results/latest.json,
latest.txt and throughput.png.

  --quick          short smoke run (3 s per scenario, 20k-request leak check, no real vLLM);
                   results go to benchmarks/work/quick/
  --skip-install   do not install missing tools (nginx, wrk, matplotlib, vllm-router)
  -h, --help       this help, followed by the driver's options

Installs what is missing: nginx and wrk (apt-get), the gateway's .venv with matplotlib (pip), and
when --targets names vllm-router, vllm-router $VLLM_ROUTER_VERSION into benchmarks/work/vllm-router-venv (pip).
The real-vLLM part needs .venv-vllm (see README); it is skipped with a message when absent.

Examples:
  benchmarks/run.sh                                  # everything (~15 minutes + the leak check)
  benchmarks/run.sh --quick                          # smoke run (a few minutes)
  benchmarks/run.sh --scenarios json,paced --targets nginx,gateway --duration 20
  benchmarks/run.sh --scenarios json,stream,paced --targets baseline,vllm-router,gateway,gateway-bare \\
      --baseline main --repeat 3                     # this tree against main and vllm-router
EOF
}

install_tools() {
    need_command nginx nginx
    need_command wrk wrk
    need_command util-linux taskset
    apt_install_missing
}

install_python() {
    ensure_venv_requirements "$VENV" "$REPO_DIR/requirements.txt"
    if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
        info "installing matplotlib into $VENV"
        pip_install "$VENV" matplotlib >&2
    fi
}

# names_target NAME ARGS...: whether the driver's --targets (as ARGS pass it) names NAME.
names_target() {
    local name="$1" list="" expect=0 arg
    shift
    for arg in "$@"; do
        if ((expect)); then
            list="$arg"
            expect=0
        elif [[ "$arg" == --targets ]]; then
            expect=1
        elif [[ "$arg" == --targets=* ]]; then
            list="${arg#--targets=}"
        fi
    done
    [[ ",${list// /}," == *",$name,"* ]]
}

install_vllm_router() {
    local installed=""
    if [[ -x "$VLLM_ROUTER_VENV/bin/python" ]]; then
        installed="$("$VLLM_ROUTER_VENV/bin/python" -c \
            'import importlib.metadata as m; print(m.version("vllm-router"))' 2>/dev/null || true)"
    fi
    if [[ "$installed" == "$VLLM_ROUTER_VERSION" && -x "$VLLM_ROUTER_VENV/bin/vllm-router" ]]; then
        return 0
    fi
    need_python_venv
    apt_install_missing
    make_venv "$VLLM_ROUTER_VENV"
    info "installing vllm-router $VLLM_ROUTER_VERSION into $VLLM_ROUTER_VENV"
    pip_install "$VLLM_ROUTER_VENV" "vllm-router==$VLLM_ROUTER_VERSION" >&2
}

raise_open_files() {
    # 1024 streams hold two sockets each in every proxy, plus wrk's; the default soft limit is often 1024.
    local hard
    hard="$(ulimit -Hn)"
    if [[ "$hard" == unlimited ]] || ((hard > 65536)); then
        ulimit -n 65536
    else
        ulimit -n "$hard"
    fi
    if (($(ulimit -n) < 4096)); then
        info "warning: only $(ulimit -n) open files allowed; the 1024-stream scenario may fail"
    fi
}

main() {
    local install=1 args=() arg
    for arg in "$@"; do
        case "$arg" in
            -h | --help)
                usage
                echo
                if [[ -x "$VENV/bin/python" ]]; then
                    "$VENV/bin/python" "$BENCH_DIR/bench.py" --help
                fi
                return 0
                ;;
            --skip-install) install=0 ;;
            *) args+=("$arg") ;;
        esac
    done
    if ((install)); then
        install_tools
        install_python
        if names_target vllm-router "${args[@]}"; then
            install_vllm_router
        fi
    fi
    if (($(nproc) < 2)); then
        info "warning: fewer than 2 cores; the proxy and the load will share a core"
    fi
    raise_open_files
    cd "$REPO_DIR"
    exec "$VENV/bin/python" "$BENCH_DIR/bench.py" "${args[@]}"
}

main "$@"
