#!/usr/bin/env bash
# Usage: stop_api_server.sh [OPTIONS]
#
# Stop the gateway like a model: SIGTERM to the gateway, then to the rest of its process group,
# SIGKILL after the timeout; afterwards its port is free. A stale PID file is removed.
#
# Options:
#   -t, --timeout SECS    how long it may take to exit after SIGTERM (default: $VLLM_STOP_TIMEOUT, else 60)
#   -h, --help            show this help
#
# Exit status: 0 stopped (or was not running), 1 it could not be stopped.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

main() {
    local timeout="${VLLM_STOP_TIMEOUT:-60}"
    while (($# > 0)); do
        case "$1" in
            -t | --timeout) timeout="${2:?--timeout needs seconds}"; shift ;;
            -h | --help) usage_from_header "$0"; return 0 ;;
            *) die 2 "unknown argument $1 (see --help)" ;;
        esac
        shift
    done
    [[ "$timeout" =~ ^[0-9]+$ ]] || die 2 "--timeout takes whole seconds"
    init_dirs
    load_gateway_env
    gateway_settings
    lock gateway
    request_stop api_server  # the supervisor must not start it again
    let_supervisor_look
    local status=0
    stop_services "$timeout" "gateway|$GATEWAY_PID_FILE|$GATEWAY_LISTEN_HOST|$GATEWAY_LISTEN_PORT" || status=1
    stop_supervisor_if_idle "$timeout" || status=1
    return "$status"
}

main "$@"
