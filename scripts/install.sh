#!/usr/bin/env bash
# Usage: scripts/install.sh [-h|--help]
#
# Install the gateway: a virtualenv .venv in the repo with requirements.txt, which the start
# scripts use to run vllm_api_server.py, and its request path compiled by mypyc into .build/compiled
# (scripts/compile_gateway.py; gcc and the Python headers are installed for it when missing). Safe to
# run again: nothing is reinstalled while requirements.txt is unchanged, nothing recompiled while the
# sources are. vLLM itself is installed separately on the GPU hosts.
#
# Environment: PYTHON makes the virtualenv (default: the fastest Python 3.11+ found, which it says);
# PIP_ARGS adds pip arguments.
#
# Exit status: 0 installed, 1 something failed, 2 bad command line.
set -euo pipefail

# shellcheck source=scripts/install_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/install_lib.sh"

main() {
    while (($# > 0)); do
        case "$1" in
            -h | --help) usage_from_header "$0"; return 0 ;;
            *) die 2 "unknown argument $1 (see --help)" ;;
        esac
    done
    need_python_venv
    apt_install_missing
    ensure_venv_requirements "$VLLM_REPO_DIR/.venv" "$VLLM_REPO_DIR/requirements.txt"
    install_project "$VLLM_REPO_DIR/.venv"
    compile_request_path "$VLLM_REPO_DIR/.venv"
    info "done: .venv/bin/python vllm_api_server.py serve"
}

main "$@"
