#!/usr/bin/env bash
# Usage: stop_all_services.sh [OPTIONS]
#
# Stop the gateway (stop_api_server.sh), then every model (stop_all_models.sh).
#
# Options:
#   -c, --config FILE     model config (default: $VLLM_MODEL_CONFIG, else vllm_model_configs.sh)
#   -t, --timeout SECS    how long each may take to exit after SIGTERM (default: $VLLM_STOP_TIMEOUT, else 60)
#   -h, --help            show this help
#
# Exit status: 0 all stopped, 1 something could not be stopped, 2 bad config or arguments.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

main() {
    local status=0
    local -a model_args=() timeout_args=()
    while (($# > 0)); do
        case "$1" in
            -c | --config) model_args+=(--config "${2:?--config needs a file}"); shift ;;
            -t | --timeout) timeout_args+=(--timeout "${2:?--timeout needs seconds}"); shift ;;
            -h | --help) usage_from_header "$0"; return 0 ;;
            *) die 2 "unknown argument $1 (see --help)" ;;
        esac
        shift
    done
    "$VLLM_REPO_DIR/stop_api_server.sh" "${timeout_args[@]}" || status=1
    "$VLLM_REPO_DIR/stop_all_models.sh" "${model_args[@]}" "${timeout_args[@]}" || status=$?
    return "$status"
}

main "$@"
