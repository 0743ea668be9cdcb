# shellcheck shell=bash
# scripts/install_lib.sh: what the install scripts share (virtualenvs, system packages); sourced.
#
# Settings from the environment:
#   PYTHON         interpreter the virtualenvs are made from (default: the fastest Python 3.11+
#                  found, pick_python)
#   PIP_ARGS       extra `pip install` arguments, e.g. "--extra-index-url URL" (split on spaces)

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

INSTALL_PYTHON="${PYTHON:-python3}"
APT_MISSING=()

# as_root COMMAND...: run COMMAND as root, through sudo when we are not root.
as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die 1 "root is needed for: $*"
    fi
}

# need_command PACKAGE COMMAND: remember PACKAGE for apt_install_missing when COMMAND is absent.
need_command() {
    local package="$1" command="$2"
    command -v "$command" >/dev/null 2>&1 || APT_MISSING+=("$package")
}

# need_python_venv: Debian ships `python3 -m venv` without pip until python3-venv is installed.
need_python_venv() {
    command -v "$INSTALL_PYTHON" >/dev/null 2>&1 || die 1 "no $INSTALL_PYTHON; set PYTHON=/path/to/python3"
    "$INSTALL_PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || APT_MISSING+=(python3-venv)
}

# need_compiler PYTHON: remember what mypyc needs to compile the request path for PYTHON
# (scripts/compile_gateway.py): gcc, and PYTHON's headers (Debian's python3-dev for its own python3).
need_compiler() {
    local python="$1"
    need_command gcc gcc
    "$python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
        APT_MISSING+=(python3-dev)
}

# apt_install_missing: install what need_* found missing; `apt-get update` runs only then, once.
# Packages that ship a service (nginx, redis-server, prometheus) are installed without it being started or
# enabled: the tests and benchmarks start their own instances on free ports, and a machine should not
# gain a system service it never asked for.
apt_install_missing() {
    if ((${#APT_MISSING[@]} == 0)); then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die 1 "missing ${APT_MISSING[*]} and there is no apt-get: install them by hand"
    info "installing system packages: ${APT_MISSING[*]}"
    # Wait for another apt run (unattended upgrades, a parallel job) instead of failing at once.
    as_root apt-get -o DPkg::Lock::Timeout=300 update -qq
    deny_service_starts
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
        install -y -qq --no-install-recommends "${APT_MISSING[@]}" || {
        allow_service_starts
        die 1 "apt-get could not install ${APT_MISSING[*]}"
    }
    allow_service_starts
    disable_services "${APT_MISSING[@]}"
    APT_MISSING=()
}

POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_OURS=0

# deny_service_starts: Debian's invoke-rc.d asks policy-rc.d before starting a service; exit 101 says no.
deny_service_starts() {
    if [[ -e "$POLICY_RC" ]]; then
        return 0  # the machine has its own policy (container images deny starts already)
    fi
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$POLICY_RC" >/dev/null
    as_root chmod 755 "$POLICY_RC"
    POLICY_RC_OURS=1
}

allow_service_starts() {
    if ((POLICY_RC_OURS)); then
        as_root rm -f "$POLICY_RC"
        POLICY_RC_OURS=0
    fi
}

# disable_services PACKAGE...: the services these freshly installed packages enabled are disabled
# and stopped (systemd), or their boot links removed (no systemd running: containers, chroots).
disable_services() {
    local package
    for package in "$@"; do
        case "$package" in
            nginx | redis-server | prometheus) ;;
            *) continue ;;
        esac
        if [[ -d /run/systemd/system ]]; then
            as_root systemctl disable --now "$package.service" >/dev/null 2>&1 || true
        else
            if command -v deb-systemd-helper >/dev/null 2>&1; then
                as_root deb-systemd-helper disable "$package.service" >/dev/null 2>&1 || true
            fi
            if command -v update-rc.d >/dev/null 2>&1; then
                as_root update-rc.d "$package" disable >/dev/null 2>&1 || true
            fi
        fi
        info "$package is installed as a command only: its service is not enabled or running"
    done
}

# pip_install VENV ARGS...: pip install into VENV with PIP_ARGS added.
pip_install() {
    local venv="$1"
    shift
    local -a extra=()
    read -ra extra <<<"${PIP_ARGS:-}"
    local -a quiet=(-q)
    if [[ "${PIP_PROGRESS:-0}" == 1 ]]; then
        quiet=()  # a long install (vLLM's CPU build: minutes) shows what it is doing
    fi
    "$venv/bin/python" -m pip install --disable-pip-version-check "${quiet[@]}" "${extra[@]}" "$@"
}

# Interpreters pick_python tries, besides PYTHON: what `python3` is on the PATH, newer releases found
# beside it, and the system's own (often faster than one found first on the PATH: see python_speed.py).
PYTHON_CANDIDATES=(python3 python3.13 python3.12 python3.11 /usr/bin/python3 /usr/local/bin/python3)

# Rounds of python_speed.py for each interpreter, taken in turns: a slow moment of a shared machine then
# falls on all of them alike rather than on one (with one round each, a pyenv build once came out ahead
# of the 1.3x faster system python3).
PYTHON_SPEED_ROUNDS=3

# pick_python: print the interpreter to make a virtualenv from: PYTHON when set; else, of
# PYTHON_CANDIDATES that can make one (3.11 or newer, with venv), the fastest at the pure-Python work
# scripts/python_speed.py times, each its best of PYTHON_SPEED_ROUNDS (by 10% at least over those found
# before it); else INSTALL_PYTHON. What was found goes to stderr.
pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        printf '%s\n' "$PYTHON"
        return 0
    fi
    local round candidate report executable version micros best="" best_micros=""
    local -a found=()
    local -A version_of=() micros_of=()
    for ((round = 0; round < PYTHON_SPEED_ROUNDS; round++)); do
        for candidate in "${PYTHON_CANDIDATES[@]}"; do
            command -v "$candidate" >/dev/null 2>&1 || continue
            report="$("$candidate" "$VLLM_REPO_DIR/scripts/python_speed.py" 2>/dev/null)" || continue
            read -r executable version micros <<<"$report"
            if [[ -z "${micros_of[$executable]:-}" ]]; then
                found+=("$executable")
                version_of[$executable]="$version"
                micros_of[$executable]="$micros"
            elif ((micros < ${micros_of[$executable]})); then
                micros_of[$executable]="$micros"
            fi
        done
    done
    for executable in "${found[@]}"; do
        micros="${micros_of[$executable]}"
        info "found Python ${version_of[$executable]} at $executable: $micros us for python_speed.py's work"
        # A later one must be 10% faster to be picked: equal builds then never flap with the noise.
        if [[ -z "$best" ]] || ((micros * 110 < best_micros * 100)); then
            best="$executable"
            best_micros="$micros"
        fi
    done
    printf '%s\n' "${best:-$INSTALL_PYTHON}"
}

# The interpreter pick_python chose, once per install: install_test_deps.sh makes two virtualenvs.
PICKED_PYTHON=""

# make_venv DIR: create the virtualenv DIR unless it already has a python.
make_venv() {
    local dir="$1"
    [[ -x "$dir/bin/python" ]] && return 0
    if [[ -z "$PICKED_PYTHON" ]]; then
        PICKED_PYTHON="$(pick_python)"
    fi
    info "creating $(display_path "$dir") from $PICKED_PYTHON"
    "$PICKED_PYTHON" -m venv "$dir"
}

# requirements_digest FILE: checksum of FILE and the files it includes with -r (one level).
requirements_digest() {
    local file="$1" dir line
    local -a files=("$file")
    dir="$(dirname "$file")"
    while IFS= read -r line; do
        if [[ "$line" =~ ^-r[[:space:]]*(.+)$ ]]; then
            files+=("$dir/${BASH_REMATCH[1]}")
        fi
    done <"$file"
    cat "${files[@]}" | sha256sum | cut -d' ' -f1
}

# install_project VENV: the repo itself into VENV, editable, without its dependencies (the
# requirements files bring those): it gives VENV the console scripts vllm-gateway and vllm-simulator.
install_project() {
    local venv="$1"
    if [[ -x "$venv/bin/vllm-gateway" && -x "$venv/bin/vllm-simulator" ]]; then
        return 0
    fi
    info "installing the project into $(display_path "$venv") (console scripts vllm-gateway, vllm-simulator)"
    pip_install "$venv" --no-deps -e "$VLLM_REPO_DIR"
}

# compile_request_path VENV: mypyc (requirements-build.txt) compiles the gateway's request path into
# .build/compiled, which vllm_api_server.py runs while it matches the sources. Without a compiler the
# gateway runs it as Python: the same answers, at more CPU per request. Each step runs in a subshell,
# so that one that fails (and dies) ends only this optional step, with a warning.
compile_request_path() {
    local venv="$1"
    need_compiler "$venv/bin/python"
    if ! (apt_install_missing) || ! (ensure_venv_requirements "$venv" "$VLLM_REPO_DIR/requirements-build.txt") ||
        ! "$venv/bin/python" "$VLLM_REPO_DIR/scripts/compile_gateway.py"; then
        info "warning: the request path was not compiled; the gateway runs it as Python (slower, same answers)"
    fi
    APT_MISSING=()
}

# ensure_venv_requirements DIR FILE: DIR exists with FILE installed. A checksum stamp in DIR skips
# pip when FILE has not changed since the last successful install.
ensure_venv_requirements() {
    local dir="$1" requirements="$2" stamp digest
    [[ -f "$requirements" ]] || die 1 "no $(display_path "$requirements")"
    make_venv "$dir"
    stamp="$dir/.installed-$(basename "$requirements").sha256"
    digest="$(requirements_digest "$requirements")"
    if [[ -f "$stamp" && "$(<"$stamp")" == "$digest" ]]; then
        info "$(display_path "$dir") is up to date with $(display_path "$requirements")"
        return 0
    fi
    info "installing $(display_path "$requirements") into $(display_path "$dir")"
    pip_install "$dir" -r "$requirements"
    printf '%s\n' "$digest" >"$stamp"
}
