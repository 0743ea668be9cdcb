#!/usr/bin/env bash
# Usage: start_api_server.sh [OPTIONS]
#
# Start the gateway (`python vllm_api_server.py serve`) in the background, in its own process group.
# The supervisor (started here when none runs) launches it and restarts it if it dies or hangs, as it
# does the models (docs/fleet.md).
# Its settings come from the environment and from GATEWAY_ENV_FILE (default gateway.env in the repo,
# when present), read with `set -a`. First `python vllm_api_server.py keys init` runs here in the
# foreground, so an admin key made on the first start is printed on this terminal.
# python is $GATEWAY_PYTHON, else .venv/bin/python, else python3. The gateway writes its own log
# (vllm_api_server.log); its stdout and stderr go to api_server.stdout.log in the same directory.
#
# Options:
#   -n, --dry-run         print the commands and environment instead of running them
#   -w, --wait            wait until the gateway answers /health
#   -t, --timeout SECS    with --wait: give up after SECS (default 60)
#   -h, --help            show this help
#
# Exit status: 0 started (or already running), 1 it failed, 2 bad settings or the port is taken.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

main() {
    local dry_run=0 wait=0 timeout=60 python state pid
    while (($# > 0)); do
        case "$1" in
            -n | --dry-run) dry_run=1 ;;
            -w | --wait) wait=1 ;;
            -t | --timeout) timeout="${2:?--timeout needs seconds}"; shift ;;
            -h | --help) usage_from_header "$0"; return 0 ;;
            *) die 2 "unknown argument $1 (see --help)" ;;
        esac
        shift
    done
    [[ "$timeout" =~ ^[0-9]+$ ]] || die 2 "--timeout takes whole seconds"
    init_dirs
    if [[ -n "${VLLM_MODEL_CONFIG:-}" ]]; then
        # the gateway runs in the repo: a path relative to here would point elsewhere there
        export VLLM_MODEL_CONFIG
        VLLM_MODEL_CONFIG="$(absolute_path "$VLLM_MODEL_CONFIG")"
    fi
    load_gateway_env
    gateway_settings
    python="$(gateway_python)"
    local -a keys_init=("$python" vllm_api_server.py keys init)
    local -a serve=(setsid "$python" vllm_api_server.py serve)

    if ((dry_run)); then
        print_gateway_commands "${#keys_init[@]}" "${keys_init[@]}" "${serve[@]}"
        return 0
    fi
    lock gateway
    read -r state pid <<<"$(service_state "$GATEWAY_PID_FILE")"
    if [[ "$state" == running ]]; then
        info "the gateway is already running (PID $pid, port $GATEWAY_LISTEN_PORT): not started again"
    else
        [[ "$state" != stale ]] || {
            rm -f "$GATEWAY_PID_FILE"
            info "removed a stale PID file (PID $pid is gone)"
        }
        port_in_use "$GATEWAY_LISTEN_HOST" "$GATEWAY_LISTEN_PORT" &&
            die 2 "port $GATEWAY_LISTEN_PORT is already in use: the gateway was not started"
        (cd "$VLLM_REPO_DIR" && "${keys_init[@]}") || die "'${keys_init[*]}' failed: the gateway was not started"
        start_gateway "${serve[@]}" || return 1
    fi
    unlock
    if ((wait)); then
        wait_for_gateway "$timeout"
    fi
}

# print_gateway_commands N KEYS_INIT_ARGV(N words) SERVE_ARGV...
print_gateway_commands() {
    local n="$1" name
    shift
    local -a keys_init=("${@:1:n}")
    shift "$n"
    vllm_fleet print-command -- cd "$VLLM_REPO_DIR"
    [[ -z "${GATEWAY_ENV_LOADED:-}" ]] || printf '# settings read from %s\n' "$GATEWAY_ENV_LOADED"
    for name in $(compgen -e | grep -E '^(GATEWAY_|VLLM_MODEL_CONFIG$|VLLM_RUN_DIR$|VLLM_LOG_DIR$)' | sort); do
        vllm_fleet print-command -- export "$name=${!name}"
    done
    vllm_fleet print-command -- "${keys_init[@]}"
    vllm_fleet print-command --log "$GATEWAY_STDOUT_LOG" -- "$@"
}

# start_gateway ARGV...: the supervisor starts it (and restarts it as it does a model).
start_gateway() {
    rotate_log "$GATEWAY_STDOUT_LOG"
    printf '==== %s: %s starts the gateway ====\n' "$(date '+%F %T')" "$LOG_PREFIX" >>"$GATEWAY_STDOUT_LOG"
    vllm_fleet record --run-dir "$RUN_DIR" --id api_server --log "$GATEWAY_STDOUT_LOG" --mode gateway \
        --health-url "$GATEWAY_HEALTH_URL" -- "$@"
    rm -f "$GATEWAY_PID_FILE"
    request_start api_server
    ensure_supervisor
    wait_for_pid_file api_server || {
        log_tail "$LOG_DIR/supervisor.log" 10
        die "the supervisor did not start the gateway"
    }
    info "started the gateway (PID $LAUNCHED_PID, port $GATEWAY_LISTEN_PORT), output $(display_path "$GATEWAY_STDOUT_LOG")"
    sleep 1
    if [[ -z "$(group_members "$LAUNCHED_PID")" ]]; then
        request_stop api_server  # gone within a second: a setting or an install to fix, not to retry
        let_supervisor_look
        stop_services "${VLLM_STOP_TIMEOUT:-60}" "gateway|$GATEWAY_PID_FILE||" >/dev/null 2>&1 || true
        printf '%s: error: the gateway exited at once; not restarted\n' "$LOG_PREFIX" >&2
        log_tail "$GATEWAY_STDOUT_LOG"
        return 1
    fi
}

wait_for_gateway() {
    local timeout="$1" started="$SECONDS" code state pid
    while true; do
        code="$(http_status "$GATEWAY_HEALTH_URL")"
        if [[ "$code" != 000 && -n "$code" ]]; then
            info "the gateway answers $GATEWAY_HEALTH_URL (HTTP $code)"
            return 0
        fi
        read -r state pid <<<"$(service_state "$GATEWAY_PID_FILE")"
        if [[ "$state" != running ]]; then
            printf '%s: error: the gateway died while starting (the supervisor restarts it after a backoff)\n' \
                "$LOG_PREFIX" >&2
            log_tail "$GATEWAY_STDOUT_LOG"
            return 1
        fi
        if ((SECONDS - started >= timeout)); then
            die "the gateway did not answer $GATEWAY_HEALTH_URL within ${timeout}s (PID $pid still runs)"
        fi
        sleep 0.5
    done
}

main "$@"
