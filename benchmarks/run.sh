#!/usr/bin/env bash
# Benchmark the gateway against nginx as a reverse proxy and against the bare backend, in one run.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$BENCH_DIR")"
VENV="$REPO_DIR/.venv"

usage() {
    cat <<EOF
Usage: benchmarks/run.sh [--quick] [--skip-install] [driver options]

Runs the gateway, nginx as a reverse proxy and the bare nginx backend side by side under wrk, with the
proxy under test pinned to one core and the load to another, then (unless --quick) the same comparison
through a real vLLM CPU server with vLLM's own load client. Prints a table last and writes
benchmarks/results/latest.json, latest.txt and throughput.png.

  --quick          short smoke run (3 s per scenario, 20k-request leak check, no real vLLM);
                   results go to benchmarks/work/quick/
  --skip-install   do not install missing tools (nginx, wrk, matplotlib)
  -h, --help       this help, followed by the driver's options

Installs what is missing: nginx and wrk (apt-get), the gateway's .venv with matplotlib (pip).
The real-vLLM part needs .venv-vllm (see README); it is skipped with a message when absent.

Examples:
  benchmarks/run.sh                                  # everything (~15 minutes + the leak check)
  benchmarks/run.sh --quick                          # smoke run (a few minutes)
  benchmarks/run.sh --scenarios json,paced --targets nginx,gateway --duration 20
EOF
}

info() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

install_tools() {
    local missing=()
    command -v nginx >/dev/null 2>&1 || missing+=(nginx)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
    if ((${#missing[@]} > 0)); then
        info "installing ${missing[*]} (apt-get)"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
}

install_python() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        info "creating $VENV with the gateway's requirements"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q -r "$REPO_DIR/requirements.txt" >&2
    fi
    if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
        info "installing matplotlib into $VENV"
        "$VENV/bin/pip" install -q matplotlib >&2
    fi
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
    fi
    if (($(nproc) < 2)); then
        info "warning: fewer than 2 cores; the proxy and the load will share a core"
    fi
    raise_open_files
    cd "$REPO_DIR"
    exec "$VENV/bin/python" "$BENCH_DIR/bench.py" "${args[@]}"
}

main "$@"
